"""A short end-to-end training run of the VLM on generated multimodal batches (no dataset needed).

It proves the pieces fit: NaViT-packed images of mixed sizes -> MoonViT -> projector -> placeholders in a
packed multi-document token stream -> MoE LM with per-document causal attention -> Muon for every
parameter (AdamW for embeddings/head/norms/biases) -> falling loss. The generated task has learnable
structure: after each image the model must name the image's colour (needs the vision path) and continue
arithmetic progressions (needs in-context attention).

This is NOT the recipe's pipeline (that is ``kimivl run``, built from the data and stage tasks); it is the
library's own sanity run and the README's quick check on a laptop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kimivl_model.config import VLMConfig, preset
from kimivl_model.image_processing import pack_images
from kimivl_model.muon import Muon, build_param_groups, param_group_summary
from kimivl_model.vlm import KimiVL

# token ids of the generated task (the tiny/small presets reserve ids < 100 for special tokens)
MEDIA_START, MEDIA_CONTENT, MEDIA_END, IMAGE_WORD = 2, 3, 4, 6
COLOR_BASE, NUM_BASE = 100, 200
COLORS = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]],
    dtype=torch.float32,
)


@dataclass(frozen=True)
class SmokeConfig:
    preset: str = "tiny"
    steps: int = 40
    seed: int = 0
    tokens_per_batch: int = 512
    images_per_batch: int = 2
    lr: float = 2e-3
    weight_decay: float = 0.1


def _image(gen: torch.Generator, color: int, patch: int) -> torch.Tensor:
    h, w = (int(x) * 2 * patch for x in torch.randint(1, 4, (2,), generator=gen))
    img = COLORS[color][:, None, None].expand(3, h, w).clone()
    return (img + 0.1 * torch.randn(3, h, w, generator=gen)).clamp(0, 1)


def _progression(gen: torch.Generator, n: int) -> list[int]:
    a, d = int(torch.randint(0, 50, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen))
    return [NUM_BASE + (a + i * d) % 1000 for i in range(n)]


def make_batch(cfg: VLMConfig, sc: SmokeConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One packed batch: image documents then text documents, filled to ``tokens_per_batch``."""
    pad_id = cfg.media_pad_token_id
    docs: list[list[int]] = []
    images: list[torch.Tensor] = []
    for _ in range(sc.images_per_batch):
        color = int(torch.randint(0, len(COLORS), (1,), generator=gen))
        img = _image(gen, color, cfg.vit.patch_size)
        n_tok = (img.shape[1] // cfg.vit.patch_size // 2) * (img.shape[2] // cfg.vit.patch_size // 2)
        images.append(img)
        docs.append(
            [MEDIA_START, IMAGE_WORD, MEDIA_CONTENT, *[pad_id] * n_tok, MEDIA_END, COLOR_BASE + color]
        )
        docs[-1] += _progression(gen, 8)
    used = sum(map(len, docs))
    while used < sc.tokens_per_batch:
        n = min(int(torch.randint(16, 96, (1,), generator=gen)), sc.tokens_per_batch - used)
        docs.append(_progression(gen, n))
        used += n
    ids, labels, lens = [], [], []
    for d in docs:
        t = torch.tensor(d)
        lab = torch.cat((t[1:], torch.tensor([-100])))  # shift inside the document
        lab[(lab == pad_id) | (lab == MEDIA_END) | (lab == MEDIA_CONTENT)] = -100
        ids.append(t)
        labels.append(lab)
        lens.append(len(d))
    pixel_values, grid_hws = pack_images(images, patch=cfg.vit.patch_size)
    return {
        "input_ids": torch.cat(ids),
        "labels": torch.cat(labels),
        "cu_seqlens": torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()]),
        "pixel_values": pixel_values,
        "grid_hws": grid_hws,
    }


def run_smoke(
    sc: SmokeConfig, out_dir: Path | None = None, log: Callable[[str], Any] = print
) -> dict[str, Any]:
    cfg = preset(sc.preset)
    torch.manual_seed(sc.seed)
    gen = torch.Generator().manual_seed(sc.seed)
    model = KimiVL(cfg, attn_backend="auto")
    groups = build_param_groups(model, lr=sc.lr, weight_decay=sc.weight_decay)
    opt = Muon(groups)
    opt_summary = param_group_summary(groups)
    log(
        f"[smoke] preset={cfg.name} muon-managed params={opt_summary['muon_params']:,} "
        f"adamw params={opt_summary['adamw_params']:,}"
    )
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    for step in range(sc.steps):
        batch = make_batch(cfg, sc, gen)
        out = model(
            batch["input_ids"],
            cu_seqlens=batch["cu_seqlens"],
            labels=batch["labels"],
            pixel_values=batch["pixel_values"],
            grid_hws=batch["grid_hws"],
            return_logits=False,
        )
        loss = out.loss + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.language_model.update_router_bias(out.expert_load)
        losses.append(out.loss.item())
        tokens += int(batch["input_ids"].numel())
        if step % 10 == 0 or step == sc.steps - 1:
            log(f"[smoke] step {step:4d}  loss {losses[-1]:.4f}  tokens {tokens:,}")
    elapsed = time.perf_counter() - t0
    k = max(1, min(5, len(losses) // 4))
    summary: dict[str, Any] = {
        "config": asdict(sc),
        "steps": sc.steps,
        "tokens": tokens,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "losses": losses,
        "seconds": round(elapsed, 3),
        "tokens_per_second": round(tokens / elapsed, 1),
        "optimizer": opt_summary,
    }
    if out_dir is not None:
        from tasks.io.files import write_json_atomic
        from tasks.io.weights import save_native

        out_dir = Path(out_dir)
        save_native(model.state_dict(), cfg, out_dir / "checkpoint")
        summary["checkpoint"] = str(out_dir / "checkpoint")
        write_json_atomic(summary, out_dir / "summary.json")
    return summary
