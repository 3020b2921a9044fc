"""Tokenizers as a pluggable part: the project's trained BPE, or a checkpoint's tokenizer in a public format.

``load_tokenizer(DIR)`` reads whichever of the two formats ``DIR`` holds and returns a ``TextTokenizer``:

- **HF** ``tokenizer.json`` (the project's own byte-level BPE, ``tasks.data.tokenizer``, or any
  ``tokenizers`` file), encoded with HF ``tokenizers``;
- **tiktoken**, the format the public Kimi-VL / Moonlight checkpoints ship: ``tiktoken.model`` (one
  ``base64(token bytes) rank`` line per BPE token) + ``tokenizer_config.json`` whose
  ``added_tokens_decoder`` names the special tokens at their ids, encoded with ``tiktoken``. As in the public
  ``tokenization_moonshot.py``: the special block starts right after the BPE ranks and holds 256 ids; ids
  the config does not name are ``<|reserved_token_{id}|>``; the pre-tokenization pattern is
  ``KIMI_PAT_STR``. Long inputs are encoded in pieces (at most 400,000 characters, no run of more than
  25,000 whitespace or non-whitespace characters), as the public tokenizer does, because tiktoken's regex
  engine panics or slows down quadratically beyond that.

Either may sit beside a ``tokenizer_config.json`` (``bos_token``/``eos_token``/``pad_token`` rename those
roles, e.g. ``[BOS]``/``[EOS]``; ``chat_template`` is the conversation template) or a ``chat_template.jinja``.
Every special-token id used anywhere (tokenize step, packer, loader, loss masks, evaluation prompts,
generation) comes from ``TextTokenizer.special``; ``check_model_ids`` compares them with a model config
before any work.

Encoding never turns special-token strings inside text into control tokens (tiktoken: encoded as plain
text; HF: the tokenize step quarantines such text first), except the think markers where the tokenizer
has them as single tokens. BPE itself is never reimplemented here: only the files are parsed (tiktoken's own
loader caches files by path in ``$TMPDIR/data-gym-cache`` and would return stale ranks for a rewritten
file, and its errors do not name the line).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from tasks.data.special_tokens import OPTIONAL_ROLES, ROLE_STRINGS, THINK_END, THINK_START, SpecialIds

HF_FILE = "tokenizer.json"
TIKTOKEN_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (HF_FILE, TIKTOKEN_FILE, CONFIG_FILE, TEMPLATE_FILE)
NUM_RESERVED_SPECIAL = 256  # the public tiktoken tokenizer's special block after the BPE ranks
# tokenization_moonshot.py's pre-tokenizer (Han runs, cased words with contractions, 1-3 digit numbers, ...)
KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_MAX_CHARS = 400_000
_MAX_RUN = 25_000
_RUN_RE = re.compile(rf"\s{{{_MAX_RUN + 1},}}|\S{{{_MAX_RUN + 1},}}")


class TokenizerFormatError(ValueError):
    """A tokenizer directory that cannot be used; the message names the file and field."""


class TokenizerMismatchError(ValueError):
    """A tokenizer whose ids do not fit a model config; the message names both values."""


Kind = Literal["hf", "tiktoken"]


@dataclass(frozen=True)
class TextTokenizer:
    """One loaded tokenizer: encode/decode plain text, and the ids of the format's special tokens."""

    kind: Kind
    directory: Path
    backend: Any  # tokenizers.Tokenizer | tiktoken.Encoding
    special: SpecialIds
    special_strings: dict[int, str]  # every special/added token id -> its string (incl. reserved ones)
    vocab_size: int  # ids this tokenizer defines: max id + 1
    chat_template: str | None
    config: dict[str, Any]  # tokenizer_config.json ({} without one)
    files: tuple[str, ...]  # the files of DIR that make up this tokenizer

    # ----------------------------------------------------------------------------------------- encode
    @cached_property
    def _allowed(self) -> frozenset[str]:
        """Special strings that stay single tokens inside text: the think markers, when the tokenizer has them."""
        return frozenset(
            s for s, i in ((THINK_START, self.special.think_start), (THINK_END, self.special.think_end)) if i
        )

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0] if self.kind == "tiktoken" else self._hf_ids(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "hf":
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids and each token's start as a character offset into ``text`` (for per-span loss masks)."""
        if not text:
            return [], []
        if self.kind == "hf":
            e = self.backend.encode(text, add_special_tokens=False)
            return list(e.ids), [s for s, _ in e.offsets]
        ids: list[int] = []
        starts: list[int] = []
        for base, piece in _pieces(text):
            got = self.backend.encode(piece, allowed_special=self._allowed, disallowed_special=())
            _, offs = self.backend.decode_with_offsets(got)
            ids += got
            starts += [base + o for o in offs]
        return ids, starts

    def _hf_ids(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; special tokens appear as their strings."""
        ids = [int(t) for t in ids]
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=False)
        return self.backend.decode(ids, errors="replace")

    def token_to_id(self, token: str) -> int | None:
        """The id of a single token string (a special token's, or a whole BPE token's), else None."""
        if self.kind == "hf":
            return self.backend.token_to_id(token)
        if token in self.backend._special_tokens:
            return self.backend._special_tokens[token]
        try:
            return self.backend.encode_single_token(token.encode())
        except KeyError:
            return None

    @cached_property
    def reserved_strings(self) -> tuple[str, ...]:
        """Special strings a document may not contain literally (every special token but the think markers)."""
        return tuple(s for s in self.special_strings.values() if s not in (THINK_START, THINK_END))

    def max_used_id(self) -> int:
        """The largest id encoding can emit: a BPE token or a named special token (never a reserved one)."""
        named = max(self.special.ids())
        return max(named, self.base_vocab_size - 1)

    @property
    def base_vocab_size(self) -> int:
        if self.kind == "hf":
            return self.backend.get_vocab_size(with_added_tokens=False)
        return len(self.backend._mergeable_ranks)

    def describe(self) -> dict[str, Any]:
        """Manifest record of this tokenizer: format, sizes and every special role's id."""
        return {
            "format": self.kind,
            "directory": str(self.directory),
            "vocab_size": self.vocab_size,
            "max_used_id": self.max_used_id(),
            "special_ids": self.special.as_dict(),
            "chat_template": self.chat_template is not None,
        }


def _pieces(text: str) -> list[tuple[int, str]]:
    """(offset, piece): chunks of at most _MAX_CHARS characters, each cut again wherever a run of one
    character class (whitespace / non-whitespace) grows past _MAX_RUN: the public tokenizer's cuts."""
    out = []
    for base in range(0, len(text), _MAX_CHARS):
        chunk = text[base : base + _MAX_CHARS]
        cuts = {0, len(chunk)}
        for m in _RUN_RE.finditer(chunk):
            cuts.update(range(m.start() + _MAX_RUN, m.end(), _MAX_RUN))
        bounds = sorted(cuts)
        out += [(base + a, chunk[a:b]) for a, b in itertools.pairwise(bounds)]
    return out


# ---------------------------------------------------------------------------------------------- loading


def load_tokenizer(directory: Path | str) -> TextTokenizer:
    """The tokenizer in ``directory`` (``tiktoken.model`` + ``tokenizer_config.json``, or ``tokenizer.json``)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer_dir: {d} is not a directory")
    config = _read_config(d)
    if (d / TIKTOKEN_FILE).is_file():
        if not config:
            raise TokenizerFormatError(
                f"{d / CONFIG_FILE}: missing; a tiktoken tokenizer needs it for its special tokens "
                f"(added_tokens_decoder)"
            )
        backend, specials = _load_tiktoken(d / TIKTOKEN_FILE, config, d / CONFIG_FILE)
        kind: Kind = "tiktoken"
        vocab = backend.n_vocab
    elif (d / HF_FILE).is_file():
        backend, specials = _load_hf(d / HF_FILE)
        kind = "hf"
        vocab = backend.get_vocab_size(with_added_tokens=True)
    else:
        raise FileNotFoundError(
            f"tokenizer_dir: {d} holds neither {HF_FILE} nor {TIKTOKEN_FILE} (run train_tokenizer, or import a "
            f"checkpoint with its tokenizer)"
        )
    by_string = {s: i for i, s in specials.items()}
    return TextTokenizer(
        kind=kind,
        directory=d,
        backend=backend,
        special=_resolve_roles(by_string, config, d),
        special_strings=specials,
        vocab_size=vocab,
        chat_template=_chat_template(d, config),
        config=config,
        files=tuple(f for f in TOKENIZER_FILES if (d / f).is_file()),
    )


def _read_config(d: Path) -> dict[str, Any]:
    path = d / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TokenizerFormatError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _load_hf(path: Path) -> tuple[Any, dict[int, str]]:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise TokenizerFormatError(f"{path}: not a readable tokenizers file ({e})") from None
    return tok, {i: t.content for i, t in tok.get_added_tokens_decoder().items()}


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """``tiktoken.model``: one ``base64(bytes) rank`` line per token; errors name the line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerFormatError(
                f"{path}: line {n}: expected 'base64-token rank', got {line[:60]!r}"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFormatError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


def _load_tiktoken(path: Path, config: dict[str, Any], config_path: Path) -> tuple[Any, dict[int, str]]:
    import tiktoken

    ranks = read_tiktoken_ranks(path)
    n_base = len(ranks)
    added = config.get("added_tokens_decoder")
    if not isinstance(added, dict) or not added:
        raise TokenizerFormatError(f"{config_path}: added_tokens_decoder: expected an object of id -> token")
    named: dict[int, str] = {}
    for key, entry in added.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not key.isdigit() or not isinstance(content, str):
            raise TokenizerFormatError(
                f"{config_path}: added_tokens_decoder.{key}: expected an id with {{'content': str}}"
            )
        if int(key) < n_base:
            raise TokenizerFormatError(
                f"{config_path}: added_tokens_decoder.{key}: id {key} is inside the {n_base} BPE ranks of {path.name}"
            )
        named[int(key)] = content
    top = max(n_base + NUM_RESERVED_SPECIAL, max(named) + 1)
    specials = {i: named.get(i, f"<|reserved_token_{i}|>") for i in range(n_base, top)}
    try:
        enc = tiktoken.Encoding(
            name=path.parent.name or "kimi",
            pat_str=KIMI_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={s: i for i, s in specials.items()},
        )
    except ValueError as e:
        raise TokenizerFormatError(f"{path}: tiktoken refused the vocabulary: {e}") from None
    return enc, specials


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _resolve_roles(by_string: dict[str, int], config: dict[str, Any], d: Path) -> SpecialIds:
    names = dict(ROLE_STRINGS)
    for role in ("bos", "eos", "pad"):
        if (name := _token_name(config.get(f"{role}_token"))) is not None:
            names[role] = name
    ids: dict[str, int | None] = {}
    missing = []
    for role, name in names.items():
        ids[role] = by_string.get(name)
        if ids[role] is None and role not in OPTIONAL_ROLES:
            missing.append(f"{role} {name!r}")
    if missing:
        raise TokenizerFormatError(
            f"{d}: the tokenizer lacks special tokens of the Kimi-VL format: {', '.join(missing)}"
        )
    return SpecialIds(**ids)


def _chat_template(d: Path, config: dict[str, Any]) -> str | None:
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        tpl = next(
            (t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if tpl is None and (d / TEMPLATE_FILE).is_file():
        tpl = (d / TEMPLATE_FILE).read_text()
    if tpl is not None and not isinstance(tpl, str):
        raise TokenizerFormatError(f"{d / CONFIG_FILE}: chat_template: expected a string")
    return tpl


# ------------------------------------------------------------------------------------ model agreement


def check_model_ids(tokenizer: dict[str, Any], cfg: Any, where: str) -> None:
    """Raise ``TokenizerMismatchError`` (naming both values) unless the model reads this tokenizer's ids: its
    ``<|media_pad|>`` id is the model's ``media_pad_token_id`` and every id encoding can emit is inside the
    LM's (and the CoCa caption decoder's) embedding table. ``tokenizer`` is ``TextTokenizer.describe()``, as
    loaded or as recorded in a tokenize step's manifest; ``cfg`` a ``VLMConfig``."""
    src = tokenizer.get("directory", "the data's tokenizer")
    pad = tokenizer["special_ids"]["media_pad"]
    if pad != cfg.media_pad_token_id:
        raise TokenizerMismatchError(
            f"{where}: the tokenizer ({src}) has <|media_pad|> at id {pad}, but the model config says "
            f"media_pad_token_id = {cfg.media_pad_token_id}"
        )
    top = tokenizer["max_used_id"]
    for name, vocab in (("lm.vocab_size", cfg.lm.vocab_size), ("coca.vocab_size", cfg.coca.vocab_size)):
        if top >= vocab:
            raise TokenizerMismatchError(
                f"{where}: the tokenizer ({src}) emits ids up to {top}, but the model config's {name} is {vocab}"
            )
