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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimivl_model.config import VLMConfig
from kimivl_model.sequence_parallel import SequenceShard
from kimivl_model.vlm import KimiVL
from tasks import Log
from tasks.data.row_store import is_uri
from tasks.data.sources import read_dataset_manifest
from tasks.io.faults import crash_point
from tasks.io.files import write_json_atomic
from tasks.io.manifest import Parent, write_manifest
from tasks.io.weights import NATIVE_CONFIG, NATIVE_WEIGHTS
from tasks.recipe import Recipe
from tasks.tracking.base import Tracker
from tasks.tracking.local import JsonlTracker
from tasks.train.callbacks import (
    Checkpointing,
    Console,
    LossHistory,
    Mfu,
    TokenCounter,
    Tracking,
    standard_callbacks,
)
from tasks.train.engine import LossResult, TrainEngine
from tasks.train.engine_config import EngineConfig
from tasks.train.memory import preflight as memory_preflight
from tasks.train.phase_data import build_loader, check_tokenizer, measure_tokens_per_step, tokenized_dir
from tasks.train.phase_lock import phase_lock
from tasks.train.phase_model import (
    RESULT,
    MissingParentError,
    build_model,
    final_dir,
    phase_dir,
    previous_phase,
    start_weights_file,
)
from tasks.train.schedule import LRScheduleConfig
from tasks.train.stages import PhaseConfig
from tasks.train.threads import configure_rank
from tasks.train.trainer import Trainer


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
    shard = SequenceShard.from_batch(b, model.sequence_parallel_group)  # None unless sequence parallel
    out = model(
        b["input_ids"],
        position_ids=b["position_ids"],
        cu_seqlens=b["cu_seqlens"],
        labels=b["labels"],
        pixel_values=b["pixel_values"],  # empty (0 images) for a text-only batch: the model's "no images"
        grid_hws=b["grid_hws"],
        return_logits=False,
        shard=shard,
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
    """``run_phase`` under the phase lock (``stop_after_steps``: see ``Trainer.fit``)."""
    done = read_result(out_root, phase)
    if done is not None:
        log(f"[{phase.name}] already complete: {done['checkpoint']}")
        return done
    run = build_phase(
        recipe, phase, data_root, out_root, tracker or JsonlTracker(phase_dir(out_root, phase)), log
    )
    if not run.trainer.fit(stop_after_steps):
        return {"phase": phase.name, "interrupted_at_step": run.trainer.engine.step}
    result = write_final(recipe, run, data_root, out_root)
    run.trainer.end(result)
    return result


@dataclass
class PhaseRun:
    """A phase set up to train: its trainer and the callbacks its result reads, the architecture it
    trains and the checkpoint it started from."""

    trainer: Trainer
    counter: TokenCounter
    losses: LossHistory
    cfg: VLMConfig
    parent: Parent | None


def build_phase(
    recipe: Recipe, phase: PhaseConfig, data_root: Path, out_root: Path, tracker: Tracker, log: Log
) -> PhaseRun:
    """Everything a phase trains with, checked first (memory plan, token ids), resumed when it can be."""
    plan = memory_preflight(recipe, phase, log)  # model states that cannot fit stop here, before any build
    check_tokenizer(phase, data_root, recipe.model.architecture())  # token ids the model cannot read: too
    t = recipe.train
    configure_rank(t.data_workers if phase.objective != "coca" else 0)  # ranks + workers share the cores
    model, vcfg, parent = build_model(recipe, phase, out_root)
    loader = build_loader(recipe, phase, data_root, vcfg)
    engine = build_engine(recipe, phase, model, out_root, measure_tokens_per_step(phase, loader))
    if t.data_workers and phase.objective != "coca":  # caption batches are read in this process
        m = phase.micro_batches_per_step
        loader.use_workers(
            t.data_workers,
            lambda b: engine.is_local_micro_batch(b % m),
            t.data_prefetch,
            pin_memory=engine.device.type == "cuda",
        )
    counter, losses = TokenCounter(phase, loader.source_names), LossHistory()
    callbacks = standard_callbacks(
        counter,
        losses,
        mfu=Mfu(vcfg, phase.objective),
        tracking=Tracking(tracker, plan.as_dict(), parent.uri if parent else None),
        checkpointing=Checkpointing(t.checkpoint_every_steps, t.keep_checkpoints),
        console=Console(),
    )
    ckpts = phase_dir(out_root, phase) / "checkpoints"
    trainer = Trainer(phase, engine, loader, callbacks, counter, ckpts, log, t.resume_weights_only)
    trainer.resume()
    return PhaseRun(trainer, counter, losses, vcfg, parent)


def build_engine(
    recipe: Recipe, phase: PhaseConfig, model: KimiVL, out_root: Path, tokens_per_step: float | None
) -> TrainEngine:
    """The engine with the phase's LR schedule (continued from an earlier phase where the recipe says so)."""
    start_step = 0
    if (sched_parent := lr_parent(recipe, phase)) is not None:
        done_parent = read_result(out_root, sched_parent)
        if done_parent is None:
            raise MissingParentError(
                f"phase {phase.name!r} continues the LR schedule of {sched_parent.name!r}, which has not run"
            )
        start_step = int(done_parent["schedule_end_step"])
    ecfg = EngineConfig.for_phase(
        recipe.train, phase, lr_schedule(recipe, phase, start_step, tokens_per_step)
    )
    source = start_weights_file(recipe, phase, out_root)  # frozen bf16 weights are saved from it
    if phase.objective == "coca":  # one "token" per micro-batch: the CoCa loss is already a mean
        return TrainEngine(model, ecfg, coca_loss, count_tokens=lambda b: 1, frozen_source=source)
    return TrainEngine(model, ecfg, lm_loss, frozen_source=source)


def write_final(recipe: Recipe, run: PhaseRun, data_root: Path, out_root: Path) -> dict[str, Any]:
    """The phase's ``final/``: fp32 weights, model config, ``result.json`` and a lineage manifest (parents:
    the starting checkpoint and every dataset), staged and renamed into place by rank 0."""
    engine, phase = run.trainer.engine, run.trainer.phase
    fdir = final_dir(out_root, phase)
    stage = fdir.parent / ".final.staging"
    if engine.rank == 0:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    engine.export_weights(stage / NATIVE_WEIGHTS)
    result = {
        "phase": phase.name,
        "stage": phase.stage,
        "steps": engine.step,
        "skipped_steps": engine.skipped_steps,
        "schedule_end_step": engine.cfg.schedule.start_step + engine.step,
        **run.counter.result(),
        "token_budget": phase.token_budget,
        **run.losses.result(),
        "rope_theta": run.cfg.lm.rope_theta,
        "checkpoint": str(fdir),
    }
    if engine.rank == 0:
        _write_final_files(recipe, phase, run, result, stage, data_root)
        crash_point(f"train:final_before_rename:{phase.name}")
        shutil.rmtree(fdir, ignore_errors=True)
        crash_point(f"train:final_removed_old:{phase.name}")
        stage.replace(fdir)
    engine.barrier()
    return result


def _write_final_files(
    recipe: Recipe, phase: PhaseConfig, run: PhaseRun, result: dict[str, Any], stage: Path, data_root: Path
) -> None:
    write_json_atomic(run.cfg.to_dict(), stage / NATIVE_CONFIG)
    # location-free: the checkpoint's content (and hash) must not depend on where the run directory is
    stored = {k: v for k, v in result.items() if k != "checkpoint"}
    (stage / RESULT).write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    parents = [run.parent] if run.parent else []
    for s in phase.sources:
        d = tokenized_dir(data_root, s.name)
        m = read_dataset_manifest(d)
        parents.append(Parent(uri=str(d), content_hash=m.content_hash) if is_uri(d) else m.parent_of(Path(d)))
    write_manifest(
        stage,
        kind="checkpoint",
        step=f"train:{phase.name}",
        config={"phase": phase.model_dump(mode="json"), "train": recipe.train.model_dump(mode="json")},
        parents=parents,
        counts={"tokens": result["tokens"], "steps": result["steps"]},
    )
