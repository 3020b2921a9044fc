"""The per-rank memory plan (``tasks/train/memory.py``) against what CUDA really allocates.

On CPU the plan is checked byte for byte against the engine's tensors (tests/integration/test_memory_plan.py).
Here, on a GPU, the same plan is checked against the CUDA caching allocator's own counters for one real
bf16 training step of the ``small`` preset (``TrainEngine``, DeepSpeed on CUDA): what stays allocated
after the step (weights + optimizer state; DeepSpeed drops the gradients) must be the plan's figure, and
the step's peak must hold at least the plan's model states. Skipped without CUDA (CPU CI).

    python -m pytest tests/unit/test_gpu_memory.py -s     # -s prints the measured figures
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.unit.test_gpu_path import DEV, cuda_engine_env, needs_cuda  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def _recipe(preset: str, optimizer: str, zero: int, working_weights: str = "fp32"):
    from tasks.recipe import recipe_from_dict

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["preset"] = preset
    raw["train"].update(
        optimizer=optimizer, zero_stage=zero, precision="bf16", working_weights=working_weights
    )
    return recipe_from_dict(raw, "params.yaml")


def _text_batch(vocab: int, lengths: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.cat([torch.cat((d[1:], torch.tensor([-100]))) for d in ids.split(lengths)])
    return {
        "input_ids": ids,
        "position_ids": pos,
        "cu_seqlens": cu,
        "labels": labels,
        "pixel_values": torch.zeros(0, 3 * 14 * 14),
        "grid_hws": torch.zeros(0, 2, dtype=torch.long),
    }


@needs_cuda
@pytest.mark.parametrize(
    ("optimizer", "zero", "working"), [("muon", 0, "fp32"), ("adamw", 0, "fp32"), ("muon", 0, "bf16")]
)
def test_plan_matches_cuda_allocations_of_a_bf16_step(cuda_engine_env, optimizer, zero, working):  # noqa: F811
    from kimivl_model.vlm import KimiVL
    from tasks.train import memory
    from tasks.train.engine import TrainEngine
    from tasks.train.engine_config import EngineConfig
    from tasks.train.runner import lm_loss
    from tasks.train.schedule import LRScheduleConfig

    recipe = _recipe("small", optimizer, zero, working)
    phase = recipe.phase("joint_pretrain")
    plan = memory.plan_phase(recipe, phase, world=1, device_type="cuda")
    gc.collect()  # earlier tests' tensors must not be freed during this one (they would skew the counters)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    with torch.device(DEV):
        model = KimiVL(recipe.model.vlm_config())
    model.set_trainable(list(phase.trainable))
    schedule = LRScheduleConfig(peak_lr=1e-3, min_lr=1e-4, warmup_steps=1, total_steps=4)
    cfg = EngineConfig(
        optimizer=optimizer, zero_stage=zero, precision="bf16", working_weights=working, schedule=schedule
    )
    eng = TrainEngine(model, cfg, lm_loss)
    vocab = recipe.model.vlm_config().lm.vocab_size
    for step in range(2):  # optimizer state exists from the first step on
        r = eng.train_step([_text_batch(vocab, [300, 500, 224], step)])
        assert not r.skipped and r.loss == r.loss
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    persistent = plan.weights + plan.optimizer_state
    print(
        "\nGPU_MEMORY "
        + json.dumps(
            {
                "optimizer": optimizer,
                "working_weights": working,
                "plan": plan.as_dict(),
                "allocated_after_step": after,
                "peak_during_steps": peak,
                "after_minus_plan_MiB": (after - persistent) / MiB,
                "peak_minus_plan_total_MiB": (peak - plan.total) / MiB,
            }
        )
    )
    # what survives the step is the weights + optimizer state the plan counts (+ a few small buffers:
    # RoPE tables, router bias, DeepSpeed's step counters), not a second copy of anything
    assert abs(after - persistent) < 0.02 * persistent + 64 * MiB, (after, persistent)
    # the peak holds weights, gradients or their bf16 copies, and the optimizer state at once
    assert peak >= plan.weights + plan.optimizer_state + plan.autocast_copies // 2
    if working == "bf16":  # ~half the weight bytes; the full-precision export is the fp32 masters
        assert 0 < plan.bf16_working_params == eng.low_precision_params
        state = eng.full_state_dict()
        low = {n: p for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
        assert low and all(state[n].dtype == torch.float32 for n in low)
        assert all(torch.equal(state[n].to(DEV, torch.bfloat16), p) for n, p in low.items())
