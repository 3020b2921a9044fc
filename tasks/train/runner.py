"""The generic stage runner: executes any phase of the recipe from its config (DESIGN.md: stages are config).

For one phase it: builds the model (from the previous phase's full-precision export, or from scratch /
the recipe's init checkpoint), applies the phase's RoPE theta and freezing, builds the data loader
(packed mixture for lm/sft, image-caption batches for coca), builds the DeepSpeed engine with the phase's
LR schedule, and trains until the phase's token budget is consumed (tokens of every modality counted
exactly from the batches, padding excluded). It checkpoints every ``checkpoint_every_steps`` (weights,
optimizer, RNG, loader state, token counters) and resumes from the last complete checkpoint when one
exists, continuing the identical trajectory. It finishes by exporting ``final/`` (safetensors + the model
config incl. the current RoPE theta + ``result.json`` + a lineage manifest). A phase whose ``final/`` is
complete is not run again.

Directory per phase: ``OUT/phases/<phase>/{checkpoints/step-NNNNNNNN/, final/, metrics.jsonl}``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kimivl_model.vlm import KimiVL
from tasks.io.faults import crash_point
from tasks.io.manifest import read_manifest, write_manifest
from tasks.io.weights import NATIVE_CONFIG, NATIVE_WEIGHTS, write_json_atomic
from tasks.recipe import Recipe
from tasks.tracking.base import Tracker
from tasks.tracking.local import JsonlTracker
from tasks.train.checkpoint import checkpoint_path, latest_checkpoint
from tasks.train.engine import LossResult, TrainEngine
from tasks.train.engine_config import EngineConfig
from tasks.train.flops import MfuMeter
from tasks.train.memory import preflight as memory_preflight
from tasks.train.phase_data import (
    batch_tokens,
    batch_tokens_by_source,
    build_loader,
    by_group,
    check_tokenizer,
)
from tasks.train.phase_lock import phase_lock
from tasks.train.phase_model import (
    RESULT,
    MissingParentError,
    build_model,
    final_dir,
    phase_dir,
    previous_phase,
)
from tasks.train.schedule import LRScheduleConfig
from tasks.train.stages import PhaseConfig

Log = Callable[[str], Any]


def read_result(out_root: Path, phase: PhaseConfig) -> dict[str, Any] | None:
    fdir = final_dir(out_root, phase)
    p = fdir / RESULT
    return {**json.loads(p.read_text()), "checkpoint": str(fdir)} if p.is_file() else None


# ------------------------------------------------------------------------------------- schedules


def estimated_steps(phase: PhaseConfig, tokens_per_step: float | None = None) -> int:
    """Optimizer steps the token budget buys (packed rows are ~full; the runner stops on tokens)."""
    per_step = tokens_per_step or phase.micro_batches_per_step * phase.seq_len
    return max(1, math.ceil(phase.token_budget / per_step))


def lr_parent(recipe: Recipe, phase: PhaseConfig) -> PhaseConfig | None:
    """The phase whose schedule a ``continue`` phase carries on."""
    if phase.lr.mode != "continue":
        return None
    if phase.lr.continue_from is not None:
        return recipe.phase(phase.lr.continue_from)
    return previous_phase(recipe, phase)


def _schedule_head(recipe: Recipe, phase: PhaseConfig) -> PhaseConfig:
    while (parent := lr_parent(recipe, phase)) is not None:
        phase = parent
    return phase


def lr_schedule(
    recipe: Recipe, phase: PhaseConfig, start_step: int, tokens_per_step: float | None = None
) -> LRScheduleConfig:
    """One schedule spans a ``fresh`` phase and every phase that (transitively) continues it."""
    head = _schedule_head(recipe, phase)
    members = [p for p in recipe.phases if _schedule_head(recipe, p) is head]
    total = sum(estimated_steps(p, tokens_per_step if p is phase else None) for p in members)
    lead = head.lr
    return LRScheduleConfig(
        type=lead.schedule,
        peak_lr=lead.peak_lr,
        min_lr=lead.min_lr,
        warmup_steps=min(lead.warmup_steps, total),
        total_steps=max(total, start_step + 1),
        start_step=start_step if phase.lr.mode == "continue" else 0,
    )


# ------------------------------------------------------------------------------------------- loss


def lm_loss(model: KimiVL, b: dict[str, Any]) -> LossResult:
    out = model(
        b["input_ids"],
        position_ids=b["position_ids"],
        cu_seqlens=b["cu_seqlens"],
        labels=b["labels"],
        pixel_values=b["pixel_values"] if b["grid_hws"].numel() else None,
        grid_hws=b["grid_hws"] if b["grid_hws"].numel() else None,
        return_logits=False,
    )
    return LossResult(
        loss_sum=out.loss_sum,
        num_tokens=int(out.num_loss_tokens),
        extra_loss=out.aux_loss,
        metrics={"aux_loss": float(out.aux_loss.detach())},
        expert_load=out.expert_load,
    )


def coca_loss(model: KimiVL, b: dict[str, Any]) -> LossResult:
    out = model.coca_forward(b["pixel_values"], b["grid_hws"], b["caption_ids"], b["caption_cu_seqlens"])
    return LossResult(
        loss_sum=out.loss,  # already a mean; one "token" per micro-batch -> mean over micro-batches
        num_tokens=1,
        metrics={
            "siglip_loss": float(out.siglip_loss.detach()),
            "caption_loss": float(out.caption_loss.detach()),
        },
    )


# ------------------------------------------------------------------------------------------- run


def run_phase(
    recipe: Recipe,
    phase: PhaseConfig,
    data_root: Path,
    out_root: Path,
    *,
    tracker: Tracker | None = None,
    log: Log = print,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train one phase to its token budget (resuming if possible); returns its result dict. Rank 0 holds
    the phase directory's lock throughout (``tasks/train/phase_lock.py``): a second trainer of the same
    phase and run directory stops with ``PhaseBusyError`` before any work."""
    if int(os.environ.get("RANK", "0")) != 0:
        return _run_phase(recipe, phase, data_root, out_root, tracker, log, stop_after_steps)
    with phase_lock(phase_dir(out_root, phase)):
        return _run_phase(recipe, phase, data_root, out_root, tracker, log, stop_after_steps)


def _run_phase(
    recipe: Recipe,
    phase: PhaseConfig,
    data_root: Path,
    out_root: Path,
    tracker: Tracker | None,
    log: Log,
    stop_after_steps: int | None,
) -> dict[str, Any]:
    """``run_phase`` under the phase lock.

    ``stop_after_steps`` ends the process's work after that many optimizer steps of this call (tests use it
    to simulate an interruption); the phase then stays unfinished and resumes on the next call.
    """
    done = read_result(out_root, phase)
    if done is not None:
        log(f"[{phase.name}] already complete: {done['checkpoint']}")
        return done
    pdir = phase_dir(out_root, phase)
    tracker = tracker or JsonlTracker(pdir)
    plan = memory_preflight(recipe, phase, log)  # model states that cannot fit stop here, before any build
    check_tokenizer(
        phase, data_root, recipe.model.architecture()
    )  # token ids the model cannot read: likewise
    model, vcfg, parent = build_model(recipe, phase, out_root)
    start_step = 0
    if (sched_parent := lr_parent(recipe, phase)) is not None:
        done_parent = read_result(out_root, sched_parent)
        if done_parent is None:
            raise MissingParentError(
                f"phase {phase.name!r} continues the LR schedule of {sched_parent.name!r}, which has not run"
            )
        start_step = int(done_parent["schedule_end_step"])
    tokens_per_step = None
    if phase.objective == "coca":  # caption batches are not seq_len rows: measure a fresh loader's batches
        probe = build_loader(recipe, phase, data_root, vcfg)
        tokens_per_step = (
            phase.micro_batches_per_step * sum(sum(next(probe)["tokens"].values()) for _ in range(3)) / 3
        )
    t = recipe.train
    ecfg = EngineConfig(
        optimizer=t.optimizer,
        zero_stage=t.zero_stage,
        precision=t.precision,
        working_weights=t.working_weights,
        muon_ns_dtype=t.muon_ns_dtype,
        schedule=lr_schedule(recipe, phase, start_step, tokens_per_step),
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        micro_batches_per_step=phase.micro_batches_per_step,
        max_consecutive_nonfinite=t.max_consecutive_nonfinite,
        seed=t.seed,
    )
    loss_fn = coca_loss if phase.objective == "coca" else lm_loss
    count = (lambda b: 1) if phase.objective == "coca" else None
    engine = TrainEngine(
        model,
        ecfg,
        loss_fn,
        tracker=tracker,
        log_step_metrics=False,
        **({"count_tokens": count} if count else {}),
    )
    loader = build_loader(recipe, phase, data_root, vcfg)
    tokens = {"text": 0, "image": 0, "video": 0}
    # tokens per mixture source: what the phase actually consumed of each dataset (None: a checkpoint
    # written before this accounting existed was resumed, so the counts would be partial)
    by_source: dict[str, int] | None = dict.fromkeys(loader.source_names, 0)
    losses: list[float] = []
    ckpt_root = pdir / "checkpoints"
    last = latest_checkpoint(ckpt_root)
    if last is not None:
        extra = engine.load_checkpoint(last)
        loader.load_state_dict(extra["loader"])
        tokens, losses = extra["tokens"], extra["losses"]
        by_source = extra.get("tokens_by_source")
        if by_source is None:
            log(
                f"[{phase.name}] {last.name} predates per-source token accounting: not reported for this phase"
            )
        log(f"[{phase.name}] resumed from {last.name} at {sum(tokens.values()):,} tokens")
    elif engine.rank == 0:
        tracker.log_params(
            {
                "phase": phase.model_dump(mode="json"),
                "engine": ecfg.model_dump(mode="json"),
                "memory": plan.as_dict(),
            }
        )
        tracker.set_tags(
            {
                "phase": phase.name,
                "stage": phase.stage,
                "parent_checkpoint": parent.uri if parent else "scratch",
            }
        )
    mfu = MfuMeter(vcfg, phase.objective, device=engine.device_type)
    budget, t0, steps_here = phase.token_budget, time.perf_counter(), 0
    base_tokens = sum(tokens.values())
    while sum(tokens.values()) < budget:
        batches = [next(loader) for _ in range(phase.micro_batches_per_step)]
        mine = batches[engine.rank :: engine.world_size]
        res = engine.train_step(mine)
        step_tokens, step_groups = 0, dict.fromkeys(by_group(phase, {}), 0)
        for b in batches:
            for k, v in batch_tokens(phase, b, loader.special.media_pad).items():
                tokens[k] += v
                step_tokens += v
            src = batch_tokens_by_source(phase, b, loader.source_names)
            for g, v in by_group(phase, src).items():
                step_groups[g] += v
            if by_source is not None:
                for k, v in src.items():
                    by_source[k] += v
        if (
            not res.skipped
            and phase.router_bias_update
            and res.expert_load is not None
            and res.expert_load.numel()
        ):
            with torch.no_grad():
                model.language_model.update_router_bias(res.expert_load.to(torch.float32))
        losses.append(res.loss)
        steps_here += 1
        elapsed = time.perf_counter() - t0
        metrics = {
            "loss": res.loss,
            "lr": res.lr,
            "grad_norm": res.grad_norm if math.isfinite(res.grad_norm) else -1.0,
            "skipped_steps": float(engine.skipped_steps),
            **{f"tokens_{k}": float(v) for k, v in tokens.items()},
            "tokens_total": float(sum(tokens.values())),
            "tokens_per_s": (sum(tokens.values()) - base_tokens) / max(elapsed, 1e-9),
            # this step's token share per group: the mixture's (scheduled) shares as actually trained on
            **{f"share.{g}": v / max(step_tokens, 1) for g, v in step_groups.items()},
            **{f"tokens_source.{k}": float(v) for k, v in (by_source or {}).items()},
            **{k: float(v) for k, v in res.metrics.items()},
            **mfu.update(step_tokens, time.perf_counter()),
        }
        if res.expert_load is not None and res.expert_load.numel():
            load = res.expert_load.float()
            metrics["expert_load_max_over_mean"] = float(
                (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).mean()
            )
        if engine.rank == 0:
            tracker.log_metrics(metrics, step=engine.step)
        crash_point(f"train:step:{phase.name}")
        done_budget = sum(tokens.values()) >= budget
        if engine.step % t.checkpoint_every_steps == 0 or done_budget:
            state = {
                "loader": loader.state_dict(),
                "tokens": tokens,
                "losses": losses,
                "phase": phase.name,
                **({"tokens_by_source": by_source} if by_source is not None else {}),
            }
            engine.save_checkpoint(checkpoint_path(ckpt_root, engine.step), extra_state=state)
            _prune(ckpt_root, t.keep_checkpoints)
        if engine.step % 10 == 0 or done_budget:
            log(
                f"[{phase.name}] step {engine.step} loss {res.loss:.4f} lr {res.lr:.2e} tokens {sum(tokens.values()):,}/{budget:,}"
            )
        if stop_after_steps is not None and steps_here >= stop_after_steps and not done_budget:
            return {"phase": phase.name, "interrupted_at_step": engine.step}
    return _finish(
        recipe, phase, out_root, engine, vcfg, parent, tokens, by_source, losses, data_root, tracker
    )


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if (p / "checksums.json").is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _finish(
    recipe, phase, out_root, engine, vcfg, parent, tokens, by_source, losses, data_root, tracker
) -> dict[str, Any]:
    fdir = final_dir(out_root, phase)
    stage = fdir.parent / ".final.staging"
    if engine.rank == 0:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    engine.export_weights(stage / NATIVE_WEIGHTS)
    k = max(1, min(5, len(losses) // 4))
    result = {
        "phase": phase.name,
        "stage": phase.stage,
        "steps": engine.step,
        "skipped_steps": engine.skipped_steps,
        "schedule_end_step": engine.cfg.schedule.start_step + engine.step,
        "tokens": {**tokens, "total": sum(tokens.values())},
        **(
            {"tokens_by_source": dict(by_source), "tokens_by_group": by_group(phase, by_source)}
            if by_source is not None
            else {}
        ),
        "token_budget": phase.token_budget,
        "final_loss": sum(losses[-k:]) / k,
        "first_loss": sum(losses[:k]) / k,
        "rope_theta": vcfg.lm.rope_theta,
        "checkpoint": str(fdir),
    }
    if engine.rank == 0:
        write_json_atomic(vcfg.to_dict(), stage / NATIVE_CONFIG)
        # location-free: the checkpoint's content (and hash) must not depend on where the run directory is
        stored = {k: v for k, v in result.items() if k != "checkpoint"}
        (stage / RESULT).write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
        parents = [parent] if parent else []
        for s in phase.sources:
            d = Path(data_root) / "tokenized" / s.name
            parents.append(read_manifest(d).parent_of(d))
        write_manifest(
            stage,
            kind="checkpoint",
            step=f"train:{phase.name}",
            config={"phase": phase.model_dump(mode="json"), "train": recipe.train.model_dump(mode="json")},
            parents=parents,
            counts={"tokens": result["tokens"], "steps": result["steps"]},
        )
        crash_point(f"train:final_before_rename:{phase.name}")
        shutil.rmtree(fdir, ignore_errors=True)
        crash_point(f"train:final_removed_old:{phase.name}")
        stage.replace(fdir)
        tracker.log_artifact(fdir, name=f"{phase.name}-final")
    engine._barrier()
    return result


def run_phases(
    recipe: Recipe, phases: list[PhaseConfig], data_root: Path, out_root: Path, log: Log = print
) -> list[dict[str, Any]]:
    return [run_phase(recipe, p, data_root, out_root, log=log) for p in phases]
