"""Worker for tests/integration/test_engine.py and test_engine_checkpoints.py: trains a tiny MoE LM with
``TrainEngine`` on 1..N ranks.

Also the shared fixtures of those tests (model, deterministic packed batches, loss function), so the
in-process runs and the subprocess runs train exactly the same thing.

    python tests/integration/_engine_worker.py --runs muon:0 --steps 8 --out DIR [--ckpt-every 2] [--resume]
    python -m torch.distributed.run --nproc_per_node 2 tests/integration/_engine_worker.py --runs muon:0,adamw:1 ...

Each rank takes its micro-batches of every global step from ``TrainEngine.local_batches`` (``rank::world``;
under sequence parallelism its data-parallel group's, cut to its slice). Rank 0 appends one JSON line per step to
``DIR/<opt>-z<stage>/steps.jsonl``, prints ``STEP n`` and finally exports ``final.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kimivl_model.config import preset  # noqa: E402
from kimivl_model.lm import KimiLM  # noqa: E402
from kimivl_model.sequence_parallel import SequenceShard  # noqa: E402
from tasks.train.checkpoint import checkpoint_path, latest_checkpoint  # noqa: E402
from tasks.train.engine import EngineConfig, LossResult, TrainEngine  # noqa: E402
from tasks.train.launch import add_local_rank_arg, apply_local_rank, init_distributed_if_needed  # noqa: E402
from tasks.train.schedule import LRScheduleConfig  # noqa: E402

VOCAB = 256
MICRO_BATCHES = 4  # global micro-batches per optimizer step


def make_model(seed: int = 0) -> KimiLM:
    """~0.1M-param MoE LM: 2 layers (dense + MoE with 4 experts, top-2), MLA attention."""
    cfg = dataclasses.replace(
        preset("tiny").lm,
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_routed_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(seed)
    return KimiLM(cfg, attn_backend="sdpa")


def make_micro_batch(step: int, index: int, tokens: int = 64) -> dict[str, torch.Tensor]:
    """Deterministic packed sequence of arithmetic progressions; document count/lengths vary by batch,
    so micro-batches hold different numbers of target tokens (exercises token weighting)."""
    g = torch.Generator().manual_seed(1000 * step + index)
    ids, labels, lens = [], [], []
    left = tokens
    while left > 0:
        n = min(int(torch.randint(8, 40, (1,), generator=g)), left)
        a, d = int(torch.randint(0, 100, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        t = torch.tensor([(a + i * d) % VOCAB for i in range(n)])
        lab = torch.cat((t[1:], torch.tensor([-100])))
        lab[: int(torch.randint(0, 3, (1,), generator=g))] = -100  # a few unlabelled prompt tokens
        ids.append(t)
        labels.append(lab)
        lens.append(n)
        left -= n
    return {
        "input_ids": torch.cat(ids),
        "labels": torch.cat(labels),
        "cu_seqlens": torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()]),
    }


def global_batch(step: int, m: int = MICRO_BATCHES) -> list[dict[str, torch.Tensor]]:
    return [make_micro_batch(step, j) for j in range(m)]


def loss_fn(model: KimiLM, mb: dict[str, torch.Tensor]) -> LossResult:
    shard = SequenceShard.from_batch(
        mb, model.sequence_parallel_group
    )  # sequence parallel: this rank's slice
    out = model(
        mb["input_ids"], cu_seqlens=mb["cu_seqlens"], labels=mb["labels"], return_logits=False, shard=shard
    )
    loss_sum = out.loss_sum
    if "poison" in mb:  # NaN injection for the tests: "mul" poisons grads too, "add" only the loss value
        loss_sum = loss_sum * float("nan") if mb["poison"] == "mul" else loss_sum + float("nan")
    return LossResult(
        loss_sum=loss_sum,
        num_tokens=int(out.num_loss_tokens),
        extra_loss=out.aux_loss,
        metrics={"ce_sum": float(out.loss_sum.detach())},
        expert_load=out.expert_load,
    )


def engine_config(optimizer: str, zero_stage: int, m: int = MICRO_BATCHES, **kw) -> EngineConfig:
    schedule = LRScheduleConfig(peak_lr=3e-3, min_lr=3e-4, warmup_steps=2, total_steps=20)
    return EngineConfig(
        optimizer=optimizer,
        zero_stage=zero_stage,
        precision="fp32",
        micro_batches_per_step=m,
        schedule=schedule,
        **kw,
    )


def train(engine: TrainEngine, model: KimiLM, start: int, steps: int, on_step=None) -> list[dict]:
    """Steps ``start .. steps-1`` (0-based global step index); router bias updated from the global load."""
    out = []
    for s in range(start, steps):
        mbs = engine.local_batches(global_batch(s, engine.cfg.micro_batches_per_step))
        r = engine.train_step(mbs)
        model.update_router_bias(r.expert_load)
        out.append({"step": r.step, "loss": r.loss, "grad_norm": r.grad_norm, "skipped": r.skipped})
        if on_step is not None:
            on_step(s, r)
    return out


def main(argv: list[str] | None = None) -> None:
    p = add_local_rank_arg(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--runs", default="muon:0", help="comma list of optimizer:zero_stage")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    apply_local_rank(args.local_rank)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, _world = init_distributed_if_needed()
    for run in args.runs.split(","):
        opt, zero, *variant = run.split(":")  # "muon:0:bf16w:shardg": variants below
        out = args.out / "-".join([f"{opt}-z{zero}", *variant])
        out.mkdir(parents=True, exist_ok=True)
        model = make_model()
        cfg = engine_config(opt, int(zero))
        for v in variant:  # "bf16w": bf16 working weights; "shardg": gradients sharded to their owners;
            update = {  # "ep2": experts split over 2 ranks (sharded gradients too); "dcp": sharded checkpoints
                "bf16w": {"precision": "bf16", "working_weights": "bf16"},
                "shardg": {"shard_gradients": True},
                "ep2": {"shard_gradients": True, "expert_parallel": 2},
                "dcp": {"checkpoint_format": "sharded"},  # checkpoints through torch.distributed.checkpoint
                "sp2": {"sequence_parallel": 2},  # each packed sequence split over 2 ranks (Ulysses)
            }
            cfg = cfg.model_copy(update=update[v])
        engine = TrainEngine(model, cfg, loss_fn)
        start = 0
        latest = latest_checkpoint(out / "ckpt") if args.resume else None
        if latest is not None:
            start = int(engine.load_checkpoint(latest)["next_step"])

        def on_step(s, r, out=out, engine=engine):
            if rank == 0:
                with open(out / "steps.jsonl", "a") as f:
                    f.write(json.dumps({"step": r.step, "loss": r.loss, "grad_norm": r.grad_norm}) + "\n")
                print(f"STEP {r.step}", flush=True)
            if args.ckpt_every and r.step % args.ckpt_every == 0:
                engine.save_checkpoint(checkpoint_path(out / "ckpt", r.step), {"next_step": s + 1})
            if args.sleep:
                time.sleep(args.sleep)

        train(engine, model, start, args.steps, on_step)
        engine.export_weights(out / "final.safetensors")
        if args.ckpt_every == 0:  # a final checkpoint for the world-size-change test
            engine.save_checkpoint(checkpoint_path(out / "ckpt", engine.step), {"next_step": args.steps})
    if rank == 0:
        print("DONE", flush=True)


def _exit_cleanly() -> None:
    """Meet the other ranks, close the group and leave without interpreter finalisation: gloo's threads
    can abort a rank at exit ("terminate called without an active exception", seen after DONE in a full
    test run), which torchrun reports as a failed job although every step and file was written."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    _exit_cleanly()
