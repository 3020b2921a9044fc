"""Image-caption batches for the ViT stage (CoCa: SigLIP + caption loss), with progressive resolution.

Draws single-image documents from the phase's tokenized sources (caption, OCR, grounding: the text that
follows the image is its caption), exactly like the packed loader draws documents (seeded source choice
by weight, per-source seeded permutation per epoch), and re-patchifies each image at the CURRENT maximum
patch count of the progressive-resolution schedule (Kimi-VL Sec. 2.3: "gradually allow larger and larger
images"). Documents with no image or with several images are skipped and counted.

A batch is a ``PackedBatch``: the grids come from the stored image sizes (``image_sizes``, the rule of
``image_to_patches``); a draw reads the document's tokens and sizes only (a window of the permutation at a
time), and the image bytes are read and decoded when the rank that trains on the micro-batch first reads its
pixels (``images_decoded``).

Token accounting of this stage: image tokens are counted as the merged tokens the LM would see
(h*w/4 per image at the patchified size) and text tokens as caption tokens, so budgets across stages are
comparable.

State (``state_dict``): JSON-serialisable sampler RNG, per-source epoch/position, tokens drawn: restoring
it gives the identical following batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kimivl_model.image_processing import smart_resize_hw
from tasks.data.loader import MixtureConfig, PackedBatch, TokenizedSource, common_special, decode_patches

CAPTION_COLUMNS = ["input_ids", "loss_mask", "media_kind", "image_sizes"]  # what a draw reads

STATE_VERSION = 1


class CaptionLoader:
    def __init__(
        self,
        cfg: MixtureConfig,
        captions_per_batch: int,
        max_text_len: int,
        resolution: list[tuple[float, int]] | None = None,
        token_budget: int | None = None,
    ) -> None:
        if captions_per_batch < 2:
            raise ValueError(f"captions_per_batch must be >= 2 (contrastive pairs), got {captions_per_batch}")
        if cfg.weight_unit != "documents":
            raise ValueError(
                "CaptionLoader: weights are per (image, caption) document; weight_unit must be 'documents'"
            )
        self.cfg = cfg
        self.sources = [TokenizedSource(s, cfg.seed) for s in cfg.sources]
        self.special = common_special(self.sources)
        self.rng = np.random.default_rng(cfg.seed)
        self.captions_per_batch = captions_per_batch
        self.max_text_len = max_text_len
        self.resolution = list(resolution or [])
        self.token_budget = token_budget or cfg.token_budget or 1
        self.tokens_drawn = 0
        self.skipped = 0
        self.batches = 0
        self.images_decoded = 0  # by this process: the images of the micro-batches it trains on

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def max_patches(self) -> int | None:
        p = self.tokens_drawn / self.token_budget
        for until, patches in self.resolution:
            if p < until:
                return patches
        return self.resolution[-1][1] if self.resolution else None

    def _next_pair(self) -> tuple[torch.Tensor, tuple[int, int], list[int], int, str]:
        for _ in range(100_000):
            cum = np.cumsum(self.cfg.probabilities(self.tokens_drawn))
            k = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
            src = self.sources[min(k, len(self.sources) - 1)]
            row, d = src.next_columns(CAPTION_COLUMNS)  # no image bytes: the training rank reads those
            if len(d["image_sizes"]) != 1 or d["media_kind"] != "image":
                self.skipped += 1
                continue
            ids = np.asarray(d["input_ids"], dtype=np.int64)[np.asarray(d["loss_mask"], dtype=bool)]
            specials = src.special.ids()  # the caption is the document's text: no special token
            caption = [int(t) for t in ids if int(t) not in specials][: self.max_text_len]
            if not caption:
                self.skipped += 1
                continue
            icfg = src.image_cfg
            cap = min(self.max_patches() or icfg["max_patches_per_image"], icfg["max_patches_per_image"])
            size, patch = d["image_sizes"][0], icfg["patch_size"]
            # the grid from the stored size (the decode checks both): decoding waits for the rank that trains
            pad_h, pad_w = smart_resize_hw(size["h"], size["w"], patch, icfg["merge"], cap)
            hw = (pad_h // patch, pad_w // patch)
            image_tokens = (hw[0] // icfg["merge"]) * (hw[1] // icfg["merge"])
            self.tokens_drawn += image_tokens + len(caption)
            where = f"source {src.name!r} (row {row})"
            return (src, row, hw, patch, icfg["merge"], cap, where), hw, caption, image_tokens, src.name
        raise RuntimeError("CaptionLoader: no single-image document with a caption in 100,000 draws")

    def __iter__(self) -> CaptionLoader:
        return self

    def decode(self, images: list[tuple[Any, ...]]) -> torch.Tensor:
        """Patches of ``images`` (``_next_pair``'s decode arguments): their bytes read (one ``take`` per
        source) and decoded and checked now."""
        rows: dict[str, tuple[TokenizedSource, set[int]]] = {}
        for src, row, *_ in images:
            rows.setdefault(src.name, (src, set()))[1].add(row)
        records = {
            (name, r): imgs[0]
            for name, (src, rs) in rows.items()
            for r, imgs in zip(
                sorted(rs), src.store.take(sorted(rs), ["images"]).column(0).to_pylist(), strict=True
            )
        }
        self.images_decoded += len(images)
        return torch.cat([decode_patches(records[(src.name, row)], *rest) for src, row, *rest in images])

    def __next__(self) -> PackedBatch:
        patches, grids, captions, img_tok = [], [], [], 0
        by_source = dict.fromkeys(self.source_names, 0)
        for _ in range(self.captions_per_batch):
            p, hw, cap, n_img, name = self._next_pair()
            patches.append(p)
            grids.append(hw)
            captions.append(cap)
            img_tok += n_img
            by_source[name] += n_img + len(cap)
        lens = [len(c) for c in captions]
        self.batches += 1
        fields = {
            "grid_hws": torch.tensor(grids, dtype=torch.int64),  # (N, 2); pixel_values: on first use
            "caption_ids": torch.tensor([t for c in captions for t in c], dtype=torch.int64),  # (Tc,)
            "caption_cu_seqlens": torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int64),
            "tokens": {"text": sum(lens), "image": img_tok, "video": 0},
            "tokens_by_source": by_source,  # image + caption tokens per source; sums to the tokens above
        }
        return PackedBatch(fields, lambda a, b: self.decode(patches[a:b]), len(patches))

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": "caption",
            "mixture_hash": self.cfg.state_hash(),
            "rng": self.rng.bit_generator.state,
            "sources": [
                {"name": s.name, "content_hash": s.content_hash, "epoch": s.epoch, "position": s.position}
                for s in self.sources
            ],
            "tokens_drawn": self.tokens_drawn,
            "skipped": self.skipped,
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != "caption":
            raise ValueError("state: not a CaptionLoader state of this version")
        if state["mixture_hash"] != self.cfg.state_hash():
            raise ValueError("state: saved with a different mixture config")
        for saved, src in zip(state["sources"], self.sources, strict=True):
            if saved["name"] != src.name or saved["content_hash"] != src.content_hash:
                raise ValueError(f"state: source {src.name!r} differs from the saved one (name or data)")
            src.epoch, src.position, src._perm = int(saved["epoch"]), int(saved["position"]), None
        self.rng.bit_generator.state = state["rng"]
        self.tokens_drawn = int(state["tokens_drawn"])
        self.skipped = int(state["skipped"])
        self.batches = int(state["batches"])
