"""Records -> token ids + loss masks + image grids (step ``tokenize``: TOKENIZED_SCHEMA rows in a Lance
dataset, ``tasks.data.row_store``).

Media (REFERENCE.md "Image tokens in the text"): each ``<image>`` becomes
``<|media_start|>`` + tokens("image") + ``<|media_content|>`` + N x ``<|media_pad|>`` + ``<|media_end|>``
with N = (grid_h/merge) * (grid_w/merge), the grid coming from ``smart_resize_hw`` of the image's STORED
size (no decode). A ``<video>`` becomes one such block per frame with the word "video"; frame pads count
as video tokens. ``grid_hws`` holds one grid per block, in order.

Loss masks (``loss_mask[t]`` True = token t is a prediction target; the packer shifts):

- pretraining text (records with ``text``): True on every text token, on ``<|media_end|>`` and on EOS;
  False on BOS and on the rest of each media block (``<|media_start|>``, the media word,
  ``<|media_content|>``, every ``<|media_pad|>``: the model does not predict placeholders).
- conversations (``messages``), ChatML exactly as REFERENCE.md "SFT chat template"::

      <|im_system|>system<|im_middle|>...<|im_end|><|im_user|>user<|im_middle|>...<|im_end|>
      <|im_assistant|>assistant<|im_middle|>...<|im_end|>

  (no separators between turns; ``tasks.data.chat_format``, held against the tokenizer's own chat template
  when it has one, incl. a default system turn such a template adds; thinking text keeps its
  ``◁think▷``/``◁/think▷`` markers: single special tokens in the project's BPE, plain text where a
  tokenizer has no such tokens). Every special id comes from the loaded tokenizer. SFT rule: True ONLY on tokens of assistant turns: the content tokens (text and think markers;
  thinking spans excluded when ``chat.train_on_thinking`` is False), the turn's closing ``<|im_end|>``, and
  its header per ``chat.header_targets``: "special" (default) = the role special tokens ``<|im_assistant|>``
  and ``<|im_middle|>`` but not the role-name word, "all" = the whole header, "none" = no header token.
  Media blocks inside assistant turns are all False. Every system/user token is False. EOS (when added) is a
  target only if the conversation ends with an assistant turn.

Rejected records go to quarantine with a reason: placeholder/image count mismatch, a literal reserved
special-token string in the text (only the think markers may appear), an image too large for the patch
grid, an empty document, a conversation without an assistant turn, or an overlong document under
``overlong="quarantine"``. Under ``overlong="truncate"`` a document is cut to ``max_tokens_per_doc``, moved
back to the start of a media block the cut would fall in (never inside one), and the cut-off images are
dropped with their blocks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kimivl_model.image_processing import smart_resize_hw
from tasks.data.chat_format import ChatFormat
from tasks.data.io import DEFAULT_ROWS_PER_SHARD, ShardWriter, iter_rows
from tasks.data.row_store import RowWriter
from tasks.data.schema import (
    IMAGE_TOKEN,
    QUARANTINE_SCHEMA,
    RECORD_SCHEMA,
    ROLES,
    TOKENIZED_SCHEMA,
    VIDEO_TOKEN,
)
from tasks.data.special_tokens import THINK_END, THINK_START, SpecialIds
from tasks.data.text_tokenizer import TextTokenizer, TokenizerFormatError, load_tokenizer
from tasks.io.files import staged_dir
from tasks.io.manifest import Manifest, is_up_to_date, read_manifest, write_manifest

STEP = "tokenize"
ROWS_FORMAT = "lance/tokenized-2"  # rows in Lance (row_store), with image_sizes
_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")
_THINK_RE = re.compile(f"{re.escape(THINK_START)}.*?(?:{re.escape(THINK_END)}|\\Z)", re.DOTALL)


class ChatRules(BaseModel):
    """Which tokens of a conversation are loss targets (see the module docstring for the full rule)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    header_targets: Literal["none", "special", "all"] = Field(
        "special",
        description="assistant header targets: 'special' = <|im_assistant|> and <|im_middle|>, 'all' = also "
        "the role word, 'none' = no header token",
    )
    train_on_thinking: bool = Field(
        True, description="whether ◁think▷...◁/think▷ spans of assistant turns are targets (long-CoT SFT)"
    )


class TokenizeConfig(BaseModel):
    """Tokenization, media expansion and loss-mask settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patch_size: int = Field(14, ge=1, le=64, description="MoonViT patch side in pixels")
    merge: int = Field(2, ge=1, le=8, description="pixel-shuffle merge per side (2 -> 4 patches per token)")
    max_patches_per_image: int = Field(
        4096, ge=4, description="larger images are downscaled to at most this many patches (smart_resize_hw)"
    )
    max_tokens_per_doc: int = Field(
        8192, ge=16, description="documents longer than this are quarantined or truncated (see overlong)"
    )
    overlong: Literal["quarantine", "truncate"] = Field(
        "quarantine", description="what to do with documents longer than max_tokens_per_doc"
    )
    add_bos: bool = Field(True, description="prepend <|bos|> (never a target)")
    add_eos: bool = Field(
        True, description="append <|eos|> (a target for text; for chats after an assistant turn)"
    )
    chat: ChatRules = Field(default_factory=ChatRules, description="SFT loss-mask rules for conversations")
    rows_per_shard: int = Field(
        DEFAULT_ROWS_PER_SHARD,
        ge=1,
        description="rows per output shard (Lance fragment for the tokenized rows)",
    )

    @model_validator(mode="after")
    def _check(self) -> TokenizeConfig:
        if self.max_patches_per_image < self.merge**2:
            raise ValueError(
                f"max_patches_per_image={self.max_patches_per_image} must be >= merge^2={self.merge**2}"
            )
        return self


class RecordError(ValueError):
    """A record that cannot be tokenized; the message is the quarantine reason."""


class _Builder:
    """Accumulates ids, loss mask, media block spans and image grids of one document."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.mask: list[bool] = []
        self.blocks: list[tuple[int, int]] = []  # (start, end) inclusive token spans of media blocks
        self.images: list[dict[str, Any]] = []
        self.grids: list[dict[str, int]] = []

    def add(self, ids: list[int], target: bool) -> None:
        self.ids.extend(ids)
        self.mask.extend([target] * len(ids))


class DocTokenizer:
    """Tokenizes RECORD_SCHEMA rows into TOKENIZED_SCHEMA rows (pure, no I/O).

    Every special-token id comes from ``tok.special``; conversations follow ``ChatFormat`` (checked against
    the tokenizer's own chat template when it has one)."""

    def __init__(self, tok: TextTokenizer, cfg: TokenizeConfig) -> None:
        self.tok = tok
        self.cfg = cfg
        self.sp: SpecialIds = tok.special
        if cfg.add_bos and self.sp.bos is None:
            raise TokenizerFormatError(
                f"{tok.directory}: the tokenizer has no BOS token, so tokenize.add_bos must be false"
            )
        self.chat = ChatFormat(tok)
        self._words = {w: tok.encode(w) for w in ("image", "video", *ROLES)}
        self._reserved_re = re.compile("|".join(re.escape(t) for t in tok.reserved_strings))

    def grid(self, image: dict[str, Any], where: str) -> tuple[int, int]:
        """Patch grid (h, w) of a stored image, from its recorded size."""
        c = self.cfg
        try:
            ph, pw = smart_resize_hw(
                int(image["height"]), int(image["width"]), c.patch_size, c.merge, c.max_patches_per_image
            )
        except ValueError as e:
            raise RecordError(f"{where}: {e}") from None
        return ph // c.patch_size, pw // c.patch_size

    def _media(self, b: _Builder, image: dict[str, Any], word: str, where: str, end_target: bool) -> None:
        gh, gw = self.grid(image, where)
        n = (gh // self.cfg.merge) * (gw // self.cfg.merge)
        start = len(b.ids)
        s = self.sp
        b.add([s.media_start, *self._words[word], s.media_content, *[s.media_pad] * n], False)
        b.add([s.media_end], end_target)
        b.blocks.append((start, len(b.ids) - 1))
        b.images.append(image)
        b.grids.append({"h": gh, "w": gw})

    def _content(self, b: _Builder, text: str, images: list[dict], cursor: list[int], mode: str) -> None:
        """Text with placeholders expanded; ``cursor[0]`` = next unused image.

        mode: "text" (pretraining: text + media_end are targets), "assistant" (text is a target, media never),
        "other" (system/user: nothing is a target). Thinking spans (``◁think▷`` through ``◁/think▷``, or to
        the end of the turn when unclosed) are found in the text and, when ``train_on_thinking`` is off,
        every token starting inside one is not a target: the same rule whether the tokenizer has the markers
        as single tokens or as plain text.
        """
        target = mode != "other"
        mask_thinking = mode == "assistant" and not self.cfg.chat.train_on_thinking
        spans = [m.span() for m in _THINK_RE.finditer(text)] if mask_thinking else []
        pos = 0
        for piece in _PLACEHOLDER_RE.split(text):
            at, pos = pos, pos + len(piece)
            if piece == IMAGE_TOKEN:
                i = cursor[0]
                if i >= len(images):
                    raise RecordError(f"placeholder mismatch: more {IMAGE_TOKEN} than images ({len(images)})")
                self._media(b, images[i], "image", f"image {i}", mode == "text")
                cursor[0] += 1
            elif piece == VIDEO_TOKEN:
                if cursor[0] != 0 or not images:
                    raise RecordError(
                        f"placeholder mismatch: {VIDEO_TOKEN} needs all {len(images)} images as frames"
                    )
                for i, frame in enumerate(images):
                    self._media(b, frame, "video", f"video frame {i}", mode == "text")
                cursor[0] = len(images)
            elif piece and not spans:
                b.add(self.tok.encode(piece), target)
            elif piece:
                ids, starts = self.tok.encode_with_offsets(piece)
                for t, s in zip(ids, starts, strict=True):
                    b.add([t], not any(lo <= at + s < hi for lo, hi in spans))

    def tokenize(self, row: dict[str, Any]) -> dict[str, Any]:
        """One record -> one TOKENIZED_SCHEMA row; ``RecordError`` (the quarantine reason) if unusable."""
        text, messages, images = row.get("text"), row.get("messages"), list(row.get("images") or [])
        if (text is None) == (messages is None):
            raise RecordError("exactly one of text and messages must be set")
        contents = [text] if text is not None else [m["content"] for m in messages]
        for c in contents:
            if m := self._reserved_re.search(c):
                raise RecordError(f"text contains the reserved special token {m.group(0)!r}")
        self._check_media(row, contents, images)

        b = _Builder()
        if self.cfg.add_bos:
            b.add([self.sp.bos], False)
        cursor = [0]
        if text is not None:
            if not text.strip() and not images:
                raise RecordError("empty document: text is blank and there are no images")
            self._content(b, text, images, cursor, "text")
            eos_target = True
        else:
            eos_target = self._chat(b, messages, images, cursor)
        if cursor[0] != len(images):
            raise RecordError(
                f"placeholder mismatch: {cursor[0]} placeholders used but {len(images)} images given"
            )
        if self.cfg.add_eos:
            b.add([self.sp.eos], eos_target)
        return self._finish(row, b)

    def _chat(self, b: _Builder, messages: list[dict], images: list[dict], cursor: list[int]) -> bool:
        if not messages:
            raise RecordError("empty conversation: messages is an empty list")
        roles = [m["role"] for m in messages]
        bad = sorted({r for r in roles if r not in ROLES})
        if bad:
            raise RecordError(f"unknown message role(s) {bad} (expected one of {list(ROLES)})")
        if "assistant" not in roles:
            raise RecordError("conversation without an assistant turn: nothing to train on")
        header = self.cfg.chat.header_targets
        for m in self.chat.turns(messages):
            asst = m["role"] == "assistant"
            special_t = asst and header in ("special", "all")
            b.add([self.sp.role(m["role"])], special_t)
            b.add(self._words[m["role"]], asst and header == "all")
            b.add([self.sp.im_middle], special_t)
            self._content(b, m["content"], images, cursor, "assistant" if asst else "other")
            b.add([self.sp.im_end], asst)
        return roles[-1] == "assistant"

    @staticmethod
    def _check_media(row: dict[str, Any], contents: list[str], images: list[dict]) -> None:
        n_img = sum(c.count(IMAGE_TOKEN) for c in contents)
        n_vid = sum(c.count(VIDEO_TOKEN) for c in contents)
        kind = row.get("media_kind")
        if kind == "video":
            if n_vid != 1 or n_img or not images:
                raise RecordError(
                    f"placeholder mismatch: media_kind 'video' needs exactly one {VIDEO_TOKEN}, no {IMAGE_TOKEN} "
                    f"and >= 1 frame; got {n_vid} {VIDEO_TOKEN}, {n_img} {IMAGE_TOKEN}, {len(images)} images"
                )
        elif kind in ("image", "none"):
            if n_vid or n_img != len(images):
                raise RecordError(
                    f"placeholder mismatch: {n_img} {IMAGE_TOKEN} and {n_vid} {VIDEO_TOKEN} placeholders "
                    f"for {len(images)} images (media_kind {kind!r})"
                )
        else:
            raise RecordError(f"unknown media_kind {kind!r} (expected none, image or video)")

    def _finish(self, row: dict[str, Any], b: _Builder) -> dict[str, Any]:
        limit = self.cfg.max_tokens_per_doc
        truncated = False
        if len(b.ids) > limit:
            if self.cfg.overlong == "quarantine":
                raise RecordError(f"overlong: {len(b.ids)} tokens > max_tokens_per_doc={limit}")
            cut = limit
            for s, e in b.blocks:
                if s < cut <= e:
                    cut = s
            kept = sum(1 for _, e in b.blocks if e < cut)
            b.ids, b.mask = b.ids[:cut], b.mask[:cut]
            b.images, b.grids = b.images[:kept], b.grids[:kept]
            truncated = True
        if not any(b.mask[1:]):
            raise RecordError(
                "no target tokens left" + (f" after truncation to {len(b.ids)} tokens" if truncated else "")
            )
        pad_id = self.sp.media_pad
        n_pad = sum(1 for t in b.ids if t == pad_id)
        video = row["media_kind"] == "video"
        return {
            "id": row["id"],
            "kind": row["kind"],
            "source": row["source"],
            "input_ids": b.ids,
            "loss_mask": b.mask,
            "images": b.images,
            "grid_hws": b.grids,
            "image_sizes": [{"h": int(im["height"]), "w": int(im["width"])} for im in b.images],
            "media_kind": row["media_kind"],
            "num_text_tokens": len(b.ids) - n_pad,
            "num_image_tokens": 0 if video else n_pad,
            "num_video_tokens": n_pad if video else 0,
            "_truncated": truncated,
        }


def run_tokenize(in_dir: Path, tokenizer_dir: Path, out_dir: Path, cfg: TokenizeConfig) -> Manifest:
    """Tokenize the records of ``in_dir`` with the tokenizer in ``tokenizer_dir`` -> ``out_dir``."""
    in_dir, tokenizer_dir, out_dir = Path(in_dir), Path(tokenizer_dir), Path(out_dir)
    for name, d in (("in_dir", in_dir), ("tokenizer_dir", tokenizer_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"{name}: {d} is not a directory")
    parents = [read_manifest(in_dir).parent_of(in_dir), read_manifest(tokenizer_dir).parent_of(tokenizer_dir)]
    step_config = {**cfg.model_dump(mode="json"), "rows_format": ROWS_FORMAT}  # a new format reruns the step
    if is_up_to_date(out_dir, config=step_config, parents=parents):
        return read_manifest(out_dir)

    tok = load_tokenizer(tokenizer_dir)
    doc_tok = DocTokenizer(tok, cfg)
    n = q = truncated = 0
    tokens = {"text": 0, "image": 0, "video": 0}
    with staged_dir(out_dir) as stage:
        accepted = RowWriter(stage, TOKENIZED_SCHEMA, cfg.rows_per_shard)
        quarantine = ShardWriter(stage / "quarantine", QUARANTINE_SCHEMA, cfg.rows_per_shard)
        for row in iter_rows(in_dir, RECORD_SCHEMA):
            n += 1
            try:
                out = doc_tok.tokenize(row)
            except RecordError as e:
                quarantine.write({**row, "reason": f"tokenize: {e}", "step": STEP})
                q += 1
                continue
            truncated += out.pop("_truncated")
            tokens["text"] += out["num_text_tokens"]
            tokens["image"] += out["num_image_tokens"]
            tokens["video"] += out["num_video_tokens"]
            accepted.write(out)
        a = accepted.close()
        quarantine.close()
        assert a + q == n, (a, q, n)
        tokens["total"] = tokens["text"] + tokens["image"] + tokens["video"]
        return write_manifest(
            stage,
            kind="tokenized",
            step=STEP,
            content_hash=accepted.content_hash,  # of the rows: Lance's file names are random
            config=step_config,
            parents=parents,
            counts={"input": n, "accepted": a, "quarantined": q, "truncated": truncated, "tokens": tokens},
            extra={
                "image_processing": {
                    "patch_size": cfg.patch_size,
                    "merge": cfg.merge,
                    "max_patches_per_image": cfg.max_patches_per_image,
                },
                "vocab_size": tok.vocab_size,
                "tokenizer": tok.describe(),  # the special ids the packer and loader read back
                "add_bos": cfg.add_bos,  # evaluation prompts start as training documents did
            },
        )


def data_add_bos(data_root: Path) -> bool:
    """Whether the tokenized datasets under ``data_root`` start documents with BOS (their manifests say;
    True when none records it, as the step always did before recording it)."""
    root = Path(data_root) / "tokenized"
    seen = {
        read_manifest(d).extra.get("add_bos", True)
        for d in (sorted(root.iterdir()) if root.is_dir() else [])
        if (d / "manifest.json").is_file()
    }
    if len(seen) > 1:
        raise ValueError(
            f"{root}: datasets disagree on add_bos (tokenize them with one data.tokenize config)"
        )
    return seen.pop() if seen else True
