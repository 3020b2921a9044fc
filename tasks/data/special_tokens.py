"""Special tokens of the Kimi-VL format (REFERENCE.md) and the ids a loaded tokenizer gives them.

Two things live here:

- the token STRINGS of the format (``<|media_pad|>``, ``<|im_user|>``, ...), the same in every Kimi-VL
  tokenizer, and the roles they play (``ROLE_STRINGS``);
- ``SpecialIds``: which id each role has in ONE tokenizer. It is always read from the tokenizer that is in
  use (``tasks.data.text_tokenizer.TextTokenizer.special``) and travels with the data it produced (the
  tokenize step's manifest), so nothing downstream assumes an id.

The project's own byte-level BPE (trained by ``tasks.data.tokenizer``, the ``tiny``/``small`` default) puts
its special tokens FIRST, at ids 0..13 in ``OWN_BPE_SPECIALS`` order: that layout is its definition (the
tiny/small presets' ``media_pad_token_id = 5`` matches it), and ``OWN_BPE_SPECIAL_IDS`` is the only table
of fixed ids in the project. The public Kimi-VL tokenizer (tiktoken, special tokens at the TOP of its
163840-token vocabulary: ``<|media_pad|>`` = 163605) is loaded from its files with the ids they state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# the project's BOS/EOS/PAD strings; public checkpoints name their own in tokenizer_config.json ([BOS], [EOS])
PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
MEDIA_START = "<|media_start|>"
MEDIA_CONTENT = "<|media_content|>"
MEDIA_PAD = "<|media_pad|>"
MEDIA_END = "<|media_end|>"
IM_SYSTEM = "<|im_system|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_MIDDLE = "<|im_middle|>"
IM_END = "<|im_end|>"
THINK_START = "◁think▷"
THINK_END = "◁/think▷"

# the project's own BPE: these strings at ids 0..13, in this order (its definition; see the module docstring)
OWN_BPE_SPECIALS: tuple[str, ...] = (
    PAD,
    BOS,
    EOS,
    MEDIA_START,
    MEDIA_CONTENT,
    MEDIA_PAD,
    MEDIA_END,
    IM_SYSTEM,
    IM_USER,
    IM_ASSISTANT,
    IM_MIDDLE,
    IM_END,
    THINK_START,
    THINK_END,
)
OWN_BPE_SPECIAL_IDS: dict[str, int] = {t: i for i, t in enumerate(OWN_BPE_SPECIALS)}
# every special-token string of the format (a document must not contain them literally, think markers aside)
SPECIAL_TOKENS = OWN_BPE_SPECIALS
ROLE_TOKENS = {"system": IM_SYSTEM, "user": IM_USER, "assistant": IM_ASSISTANT}

# role -> the format's string for it; bos/eos/pad may be renamed by a tokenizer_config.json
ROLE_STRINGS: dict[str, str] = {
    "bos": BOS,
    "eos": EOS,
    "pad": PAD,
    "media_start": MEDIA_START,
    "media_content": MEDIA_CONTENT,
    "media_pad": MEDIA_PAD,
    "media_end": MEDIA_END,
    "im_system": IM_SYSTEM,
    "im_user": IM_USER,
    "im_assistant": IM_ASSISTANT,
    "im_middle": IM_MIDDLE,
    "im_end": IM_END,
    "think_start": THINK_START,
    "think_end": THINK_END,
}
# roles a tokenizer may lack: no BOS (then add_bos must be off), no pad, think markers as plain text
OPTIONAL_ROLES = frozenset({"bos", "pad", "think_start", "think_end"})


@dataclass(frozen=True)
class SpecialIds:
    """The id of every special-token role in one tokenizer (None: the tokenizer has no such single token;
    think markers are then ordinary text, and thinking spans are found by character offsets)."""

    eos: int
    media_start: int
    media_content: int
    media_pad: int
    media_end: int
    im_system: int
    im_user: int
    im_assistant: int
    im_middle: int
    im_end: int
    bos: int | None = None
    pad: int | None = None
    think_start: int | None = None
    think_end: int | None = None

    def role(self, message_role: str) -> int:
        """Header token of a chat message role (system / user / assistant)."""
        return getattr(self, f"im_{message_role}")

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> SpecialIds:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        missing = sorted(k for k in known - set(d) if k not in OPTIONAL_ROLES)
        if unknown or missing:
            raise ValueError(f"{where}: special_ids: unknown roles {unknown}, missing roles {missing}")
        return cls(**{k: (None if v is None else int(v)) for k, v in d.items()})

    def ids(self) -> frozenset[int]:
        return frozenset(v for v in asdict(self).values() if v is not None)


OWN_BPE_IDS = SpecialIds(**{role: OWN_BPE_SPECIAL_IDS[s] for role, s in ROLE_STRINGS.items()})
