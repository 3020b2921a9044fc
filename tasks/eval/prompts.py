"""Prompts for evaluation: content + images -> the token ids and pixel values the model reads.

Two styles, the same token format as training (``tasks.data.tokenize``, REFERENCE.md "SFT chat template"
and "Image tokens in the text"):

- ``chat``: ``<|bos|><|im_user|>user<|im_middle|>CONTENT<|im_end|><|im_assistant|>assistant<|im_middle|>``
  (BOS only when the training data has one; a default system turn first when the tokenizer's chat template
  adds one); the model's answer follows and ends with ``<|im_end|>`` (models after SFT);
- ``plain``: ``<|bos|>CONTENT`` and the model continues the document (pretrained models: e.g. an OCR
  image followed by its text, or "The red circle is at" followed by a ``<box>``).

Media placeholders (``<image>``, ``<video>``) in CONTENT are expanded by ``DocTokenizer`` exactly as in
training (one media block per image / video frame, pad count from the patch grid), and ``pixels`` turns the
same images into MoonViT patches with the grids the blocks were sized for (checked).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from kimivl_model.config import VLMConfig
from kimivl_model.image_processing import image_to_patches
from tasks.data.images import decode_image, to_tensor
from tasks.data.text_tokenizer import TextTokenizer
from tasks.data.tokenize import DocTokenizer, TokenizeConfig
from tasks.eval.metrics import strip_special

Style = Literal["chat", "plain"]
STYLES = ("chat", "plain")


class PromptBuilder:
    """Builds prompt ids and pixel values for one model config and tokenizer (no I/O).

    ``add_bos``: whether documents start with BOS, as the training data was tokenized (the tokenize step's
    ``add_bos``, recorded in its manifest). Every special id comes from ``tok.special``."""

    def __init__(
        self, tok: TextTokenizer, cfg: VLMConfig, style: Style = "chat", add_bos: bool = True
    ) -> None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        self.tok = tok
        self.cfg = cfg
        self.style = style
        kh, kw = cfg.projector.merge_kernel
        if kh != kw:
            raise ValueError(
                f"projector merge_kernel must be square for prompts, got {cfg.projector.merge_kernel}"
            )
        self.tcfg = TokenizeConfig(
            patch_size=cfg.vit.patch_size,
            merge=kh,
            max_patches_per_image=cfg.vit.max_patches_per_image,
            max_tokens_per_doc=1 << 30,
            add_bos=add_bos,
            add_eos=False,
        )
        self.doc_tok = DocTokenizer(tok, self.tcfg)
        self.eos_ids = (tok.special.eos, tok.special.im_end)
        keep = {tok.special.think_start, tok.special.think_end}
        self._not_shown = frozenset(i for i in tok.special_strings if i not in keep)
        self._header, self._footer = self._frame()

    def _frame(self) -> tuple[list[int], list[int]]:
        """The ids around a prompt's content, cut out of a tokenized conversation with empty turns (so they
        are exactly what training data holds: BOS, a default system turn, the headers)."""
        bos = [self.tok.special.bos] if self.tcfg.add_bos else []
        if self.style == "plain":
            return bos, []
        ids = self._chat_ids("")
        user = ids.index(self.tok.special.im_user)
        cut = user + 1 + len(self.encode_text("user")) + 1  # <|im_user|> user <|im_middle|>
        return ids[:cut], ids[cut:]

    def _chat_ids(
        self, content: str, images: list[dict[str, Any]] | None = None, media_kind: str = "none"
    ) -> list[int]:
        images = list(images or [])
        row: dict[str, Any] = {"id": "eval", "kind": "eval", "source": "eval", "images": images, "text": None}
        row["media_kind"] = media_kind if images else "none"
        row["messages"] = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
        ids = self.doc_tok.tokenize(row)["input_ids"]
        if ids[-1] != self.tok.special.im_end:
            raise AssertionError("chat prompt: expected the empty assistant turn to end with <|im_end|>")
        return list(ids[:-1])

    # ------------------------------------------------------------------------------------------ text
    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def header(self) -> list[int]:
        """Ids before the content (BOS when the data has one; for chat, any default system turn and the
        user-turn header)."""
        return list(self._header)

    def footer(self) -> list[int]:
        """Ids after the content (for chat: end of the user turn and the assistant header)."""
        return list(self._footer)

    def wrap(self, content_ids: list[int]) -> list[int]:
        """Text-only prompt from already tokenized content (lets callers know exact offsets)."""
        return self.header() + list(content_ids) + self.footer()

    # ----------------------------------------------------------------------------------------- media
    def encode(
        self, content: str, images: list[dict[str, Any]] | None = None, media_kind: str = "none"
    ) -> list[int]:
        """Prompt ids for ``content`` whose placeholders refer to ``images`` (IMAGE_STRUCT-like dicts with at
        least ``width``/``height``; ``media_kind`` 'video' = all images are frames of one ``<video>``)."""
        if self.style == "chat":
            return self._chat_ids(content, images, media_kind)
        images = list(images or [])
        row: dict[str, Any] = {"id": "eval", "kind": "eval", "source": "eval", "images": images}
        row["media_kind"] = media_kind if images else "none"
        row["text"], row["messages"] = content, None
        return list(self.doc_tok.tokenize(row)["input_ids"])

    def grid(self, image: dict[str, Any]) -> tuple[int, int]:
        return self.doc_tok.grid(image, "eval image")

    def pixels(self, images: list[dict[str, Any]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixel_values (P, 3, p, p), grid_hws (N, 2)) for ``images`` in order; (None, None) if none.

        An image dict may carry a decoded PIL image under ``"pil"``; otherwise ``"data"`` is decoded.
        """
        if not images:
            return None, None
        patches, grids = [], []
        for k, im in enumerate(images):
            pil = im.get("pil")
            if pil is None:
                pil = decode_image(im["data"])
            p, hw = image_to_patches(
                to_tensor(pil), self.tcfg.patch_size, self.tcfg.merge, self.tcfg.max_patches_per_image
            )
            if tuple(hw) != self.grid(im):
                raise ValueError(f"image {k}: patch grid {hw} differs from the prompt's grid {self.grid(im)}")
            patches.append(p)  # (h*w, 3, p, p)
            grids.append(hw)
        return torch.cat(patches), torch.tensor(grids, dtype=torch.int64)

    # ---------------------------------------------------------------------------------------- decode
    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Generated ids -> text, stopping at the first end token; think markers are kept."""
        ids = [int(t) for t in ids]
        for k, t in enumerate(ids):
            if t in self.eos_ids:
                ids = ids[:k]
                break
        return strip_special(self.tok.decode([t for t in ids if t not in self._not_shown]))
