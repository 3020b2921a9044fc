"""Special tokens of the Kimi-VL format (REFERENCE.md) and their fixed ids in this project's tokenizers.

Ids are fixed (0..N-1, in this order) so that model presets can name them without reading a tokenizer:
the ``tiny`` and ``small`` presets use ``media_pad_token_id = 5``. The full-size model uses the public
Kimi tokenizer's ids instead (``VLMConfig.media_pad_token_id = 163605``).
"""

from __future__ import annotations

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

SPECIAL_TOKENS: tuple[str, ...] = (
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
SPECIAL_IDS: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
MEDIA_PAD_ID = SPECIAL_IDS[MEDIA_PAD]
ROLE_TOKENS = {"system": IM_SYSTEM, "user": IM_USER, "assistant": IM_ASSISTANT}
assert MEDIA_PAD_ID == 5  # the tiny/small presets depend on it
