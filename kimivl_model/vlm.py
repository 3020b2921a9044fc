"""Kimi-VL: MoonViT -> pixel-shuffle MLP projector -> MoE language model (Kimi-VL Sec. 2.1).

Images (and video frames: a video is a sequence of frames, each encoded by MoonViT as its own image) are
packed NaViT-style into one patch sequence, encoded, merged 2x2 and projected to the LM width. The token
sequence holds, per image, ``<|media_start|>image<|media_content|>`` + N x ``<|media_pad|>`` +
``<|media_end|>``; the embeddings at ``<|media_pad|>`` positions are replaced, in order, by the projected
image features. The counts must match exactly (a mismatch is a ``ValueError`` naming both numbers).

Module names follow the public Kimi-VL checkpoint (``vision_tower``, ``multi_modal_projector``,
``language_model``) so that ``hf_interop`` is a small, explicit mapping. The CoCa head (``coca``) exists only
for the ViT training stage and is not part of the exported VLM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kimivl_model.coca import CoCaHead, CoCaOutput
from kimivl_model.config import VLMConfig
from kimivl_model.lm import KimiLM, LMOutput
from kimivl_model.moonvit import MoonViT
from kimivl_model.projector import Projector, num_image_tokens
from kimivl_model.sequence_parallel import SequenceShard, shard_tokens


class KimiVL(nn.Module):
    def __init__(self, cfg: VLMConfig, *, attn_backend: str = "auto", with_coca: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = MoonViT(cfg.vit, attn_backend=attn_backend)
        self.multi_modal_projector = Projector(cfg.projector)
        self.language_model = KimiLM(cfg.lm, attn_backend=attn_backend)
        self.coca = CoCaHead(cfg.coca, cfg.vit.hidden_size, attn_backend=attn_backend) if with_coca else None
        self.sequence_parallel_group: Any = None  # set by the training engine under sequence_parallel > 1

    @classmethod
    def from_state_dict(
        cls,
        cfg: VLMConfig,
        state_dict: dict[str, torch.Tensor],
        *,
        attn_backend: str = "auto",
        with_coca: bool = False,
        ignore_prefixes: tuple[str, ...] = ("coca.",),
    ) -> KimiVL | None:
        """The model whose parameters and buffers ARE ``state_dict``'s tensors (adopted, not copied): built
        on the meta device, so no random init is spent on weights the checkpoint replaces and the weights
        are in memory once (building then loading holds them twice: 2 x 61 GiB per rank for a3b).

        Tensors of another dtype are cast. Returns None when ``state_dict`` lacks a parameter or persistent
        buffer (e.g. the fresh CoCa head of the ViT stage): build and load the usual way then. Keys the
        model does not have are a ``ValueError``, except under ``ignore_prefixes``.
        """
        with torch.device("meta"):
            model = cls(cfg, attn_backend=attn_backend, with_coca=with_coca)
        expected = model.state_dict()
        extra = [k for k in state_dict if k not in expected and not k.startswith(ignore_prefixes)]
        if extra:
            raise ValueError(f"state dict does not fit the model: unexpected keys {extra[:5]}")
        if any(k not in state_dict for k in expected):
            return None
        adopted = {k: state_dict[k].to(v.dtype) for k, v in expected.items()}  # no copy when dtypes match
        model.load_state_dict(adopted, strict=True, assign=True)
        model.language_model.tie_weights()  # assign replaced the tied tensor under one of its two names
        for m in model.modules():
            if hasattr(m, "reset_buffers"):  # non-persistent tables (RoPE) are not in a state dict
                m.reset_buffers()
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"from_state_dict: {left[:5]} still on the meta device (no reset_buffers?)")
        return model

    # ------------------------------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        """pixel_values (P, C, 14, 14), grid_hws (N, 2) -> LM-width image tokens (sum h*w/4, lm_hidden)."""
        feats = self.vision_tower(pixel_values, grid_hws)  # (P, vit_hidden)
        return self.multi_modal_projector(feats, grid_hws)  # (P/4, lm_hidden)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        grid_hws: torch.Tensor | None = None,
        image_row_offset: int | None = None,
    ) -> torch.Tensor:
        """Token embeddings with ``<|media_pad|>`` positions replaced, in order, by image features.
        ``image_row_offset`` (a sequence-parallel slice, ``shard_batch``): the placeholders take features
        ``[offset, offset + n_pad)`` of the given images (the first and last may be cut by the slice)."""
        embeds = self.language_model.model.embed_tokens(input_ids)  # (T, hidden)
        is_pad = input_ids == self.cfg.media_pad_token_id  # (T,)
        n_pad = int(is_pad.sum())
        if pixel_values is None or grid_hws is None or grid_hws.numel() == 0:
            if n_pad:
                raise ValueError(
                    f"input_ids hold {n_pad} <|media_pad|> tokens (id {self.cfg.media_pad_token_id}) "
                    "but no images were given"
                )
            return embeds
        image_tokens = self.encode_images(pixel_values, grid_hws)  # (N_img, hidden)
        if image_row_offset is not None:
            image_tokens = image_tokens[image_row_offset : image_row_offset + n_pad]
        if image_tokens.shape[0] != n_pad:
            raise ValueError(
                f"placeholder count mismatch: input_ids hold {n_pad} <|media_pad|> tokens "
                f"(id {self.cfg.media_pad_token_id}) but the {grid_hws.shape[0]} images give "
                f"{image_tokens.shape[0]} features (grid_hws={grid_hws.tolist()})"
            )
        return embeds.masked_scatter(is_pad[:, None], image_tokens.to(embeds.dtype))

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        grid_hws: torch.Tensor | None = None,
        return_logits: bool = True,
        shard: SequenceShard | None = None,
    ) -> LMOutput:
        """Packed multimodal forward.

        input_ids (T,), cu_seqlens (S+1,) document boundaries, position_ids (T,) (default: reset per
        document), labels (T,) already shifted with -100 = ignore; pixel_values/grid_hws of every image in
        the order their placeholders appear. Sequence parallel (``shard``): the fields of ``shard_batch``'s
        slice (cu_seqlens stays the whole sequence's); see ``KimiLM.forward`` for what the outputs hold.
        """
        offset = None if shard is None else shard.image_row_offset
        embeds = self.embed(input_ids, pixel_values, grid_hws, offset)
        return self.language_model(
            inputs_embeds=embeds,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            labels=labels,
            return_logits=return_logits,
            shard=shard,
        )

    def shard_batch(self, batch: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
        """Rank ``rank``'s slice of a packed micro-batch for sequence parallelism over ``size`` ranks
        (``kimivl_model/sequence_parallel.py``): the per-token fields cut at ``split_points``, the WHOLE
        sequence's ``cu_seqlens``, the images with at least one placeholder in the slice (their patches and
        grids; from a lazily decoded batch, ``image_patches``, only those are decoded), and ``sp_cuts`` /
        ``sp_rank`` / ``sp_image_rows`` (features of those images before the slice's
        first placeholder). Other fields (per-document sources, token counts) are the whole micro-batch's."""
        out = shard_tokens(batch, rank, size)
        cuts = [int(c) for c in out["sp_cuts"].tolist()]
        a, b = cuts[rank], cuts[rank + 1]
        is_pad = batch["input_ids"] == self.cfg.media_pad_token_id
        before, inside = int(is_pad[:a].sum()), int(is_pad[a:b].sum())
        grid = batch.get("grid_hws")
        n_img = 0 if grid is None else grid.shape[0]
        feats = [0, *num_image_tokens(grid, self.cfg.projector.merge_kernel)] if n_img else [0]
        f_cum = torch.tensor(feats).cumsum(0).tolist()  # (N+1,) first feature row of each image
        if f_cum[-1] != int(is_pad.sum()):
            raise ValueError(
                f"shard_batch: {int(is_pad.sum())} <|media_pad|> tokens but the {n_img} images give {f_cum[-1]} features"
            )
        first = sum(1 for i in range(n_img) if f_cum[i + 1] <= before)  # images wholly before the slice
        last = first + sum(1 for i in range(first, n_img) if f_cum[i] < before + inside)
        if n_img:
            if hasattr(batch, "image_patches"):  # a lazily decoded batch: decode this slice's images only
                out["pixel_values"] = batch.image_patches(first, last)
            else:
                p_cum = [0, *(grid[:, 0] * grid[:, 1]).cumsum(0).tolist()]
                out["pixel_values"] = batch["pixel_values"][p_cum[first] : p_cum[last]]
            out["grid_hws"] = grid[first:last]
        elif "pixel_values" in batch:
            out["pixel_values"] = batch["pixel_values"]  # no images: the (0, 3, p, p) placeholder
            if "image_is_video" in batch:
                out["image_is_video"] = batch["image_is_video"][first:last]
        out["sp_image_rows"] = torch.tensor(before - f_cum[first], dtype=torch.int64)
        return out

    def coca_forward(
        self,
        pixel_values: torch.Tensor,
        grid_hws: torch.Tensor,
        caption_ids: torch.Tensor,
        caption_cu_seqlens: torch.Tensor,
    ) -> CoCaOutput:
        """ViT stage: L = L_siglip + 2 * L_caption on MoonViT features (needs ``with_coca=True``)."""
        if self.coca is None:
            raise RuntimeError("coca_forward needs a model built with with_coca=True (the ViT stage)")
        feats = self.vision_tower(pixel_values, grid_hws)
        return self.coca(feats, grid_hws, caption_ids, caption_cu_seqlens)

    # ------------------------------------------------------------------------------------------- utils
    def set_rope_theta(self, theta: float) -> None:
        """Long-context extension: change the LM's RoPE base (50,000 -> 800,000) on a trained model."""
        self.language_model.set_rope_theta(theta)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.vision_tower.gradient_checkpointing = enabled
        self.language_model.model.gradient_checkpointing = enabled

    def components(self) -> dict[str, nn.Module]:
        """Named trainable components, for per-stage freezing (e.g. alignment trains vit + projector)."""
        out: dict[str, nn.Module] = {
            "vit": self.vision_tower,
            "projector": self.multi_modal_projector,
            "lm": self.language_model,
        }
        if self.coca is not None:
            out["coca"] = self.coca
        return out

    def set_trainable(self, names: list[str] | tuple[str, ...]) -> None:
        """Freeze every component except ``names`` (unknown names are an error listing the known ones)."""
        comps = self.components()
        unknown = sorted(set(names) - set(comps))
        if unknown:
            raise ValueError(f"trainable: unknown components {unknown} (expected some of {sorted(comps)})")
        for name, mod in comps.items():
            mod.requires_grad_(name in names)
