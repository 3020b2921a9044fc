"""The evaluation step: a checkpoint + its tokenizer -> ``eval.json``, NIAH plots and ``report.md``.

``run_eval`` loads a native checkpoint (``tasks.io.weights.load_native``), builds every enabled task's
held-out set (``heldout.py``; checked against the training data when ``train_data_root`` is given), runs
the tasks and writes, atomically, under ``out_dir``:

- ``eval.json``: the config, held-out set statistics (overlap must be 0), per task its metrics, timing and
  per-item details of the failures (at most ``max_failures`` per task; every NIAH cell), plus ``summary``
  (flat ``task/metric`` numbers for trackers);
- ``niah_heatmap.png`` (depth x length recall grid) and ``niah_recall.png`` (recall per length bin);
- ``report.md``: Markdown tables (per task, per NIAH bin), usable as a Prefect artifact.

Generation goes through ``generate_fn`` (default ``kimivl_model.generate.greedy_generate``, imported
lazily), called as ``generate_fn(model, input_ids (T,), pixel_values=..., grid_hws=...,
max_new_tokens=..., eos_ids=...)`` and returning an object with ``tokens`` (the new ids).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.data.pack import shifted_labels
from tasks.data.text_tokenizer import check_model_ids, load_tokenizer
from tasks.data.tokenize import DocTokenizer, data_add_bos
from tasks.eval import metrics as M
from tasks.eval.heldout import HELDOUT_TASKS, EvalItem, HeldoutSet, TrainingIndex, build_heldout
from tasks.eval.niah import NIAHConfig, run_niah, summarize
from tasks.eval.prompts import PromptBuilder
from tasks.eval.report import compare_reports, render_report, summary_metrics, write_plots
from tasks.io.files import atomic_path, write_json_atomic
from tasks.io.weights import NATIVE_CONFIG, load_native

GEN_TASKS = ("vqa", "counting", "ocr", "grounding", "chart_qa", "doc_qa", "video_qa", "math")
LOSS_TASKS = ("caption_loss", "text_loss")
NIAH_TASKS = ("niah_text", "niah_video")
TASKS = (*GEN_TASKS, *LOSS_TASKS, *NIAH_TASKS)

__all__ = [
    "TASKS",
    "EvalConfig",
    "TaskSizes",
    "compare_reports",
    "render_report",
    "run_eval",
]


class TaskSizes(BaseModel):
    """Items per held-out task (defaults: the tiny model's whole eval in about a minute on a CPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vqa: int = Field(8, ge=0)
    counting: int = Field(8, ge=0)
    ocr: int = Field(8, ge=0)
    grounding: int = Field(8, ge=0)
    chart_qa: int = Field(8, ge=0)
    doc_qa: int = Field(8, ge=0)
    video_qa: int = Field(6, ge=0)
    caption_loss: int = Field(16, ge=0)
    text_loss: int = Field(16, ge=0)
    math: int = Field(4, ge=0)


class EvalConfig(BaseModel):
    """Which tasks run, how large they are, NIAH bins/depths, generation lengths, seed and device.

    The defaults size the tiny model's whole eval to about a minute on a 2-core CPU (NIAH text up to the
    tiny recipe's 8192-token long-context length, video up to 4096, three depths). A Table-2-style run
    raises ``niah.lengths``/``video_lengths`` to the model's context and uses five depths.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[str, ...] = Field(TASKS, description=f"subset of {TASKS}")
    sizes: TaskSizes = Field(default_factory=TaskSizes)
    niah: NIAHConfig = Field(default_factory=NIAHConfig)
    seed: int = Field(0, ge=0, le=99, description="held-out seed namespace 10_000 + 100*seed + task")
    prompt_style: Literal["chat", "plain"] = Field(
        "chat", description="chat (ChatML turn, models after SFT) or plain continuation (pretrained models)"
    )
    max_new_tokens: int = Field(16, ge=1, le=4096, description="tokens generated per short answer")
    ocr_max_new_tokens: int = Field(48, ge=1, le=4096)
    math_max_new_tokens: int = Field(
        224, ge=1, le=32768, description="room for a long chain of thought (tiny traces: ~150-190 tokens)"
    )
    image_min_side: int = Field(56, ge=16, le=4096, description="held-out picture sizes (SynthConfig)")
    image_max_side: int = Field(224, ge=16, le=4096)
    video_max_side: int = Field(112, ge=16, le=4096)
    loss_batch_tokens: int = Field(4096, ge=64, description="tokens per packed teacher-forcing batch")
    max_failures: int = Field(20, ge=0, description="failed items kept with details per task")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks: unknown {bad} (expected a non-empty subset of {list(TASKS)})")
        if self.image_min_side > self.image_max_side:
            raise ValueError("image_min_side must be <= image_max_side")
        return self

    def synth_overrides(self) -> dict[str, int]:
        return {
            "image_min_side": self.image_min_side,
            "image_max_side": self.image_max_side,
            "video_max_side": self.video_max_side,
        }


GenerateFn = Callable[..., Any]


def default_generate_fn() -> GenerateFn:
    try:
        from kimivl_model.generate import greedy_generate
    except ImportError as e:  # the generation module is written separately
        raise RuntimeError(
            "kimivl_model.generate.greedy_generate is not available; pass generate_fn explicitly"
        ) from e
    return greedy_generate


def resolve_checkpoint(path: Path) -> Path:
    """A native checkpoint directory, or a phase directory holding ``final/``."""
    path = Path(path)
    for cand in (path, path / "final"):
        if (cand / NATIVE_CONFIG).is_file():
            return cand
    raise FileNotFoundError(f"checkpoint: {path} holds no {NATIVE_CONFIG} (nor final/{NATIVE_CONFIG})")


def load_model(checkpoint_dir: Path, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    from kimivl_model.vlm import KimiVL

    vcfg, sd = load_native(resolve_checkpoint(checkpoint_dir))
    # the checkpoint's tensors become the weights (one copy in memory, no random init of a model they replace)
    coca = any(k.startswith("coca.") for k in sd)
    model = KimiVL.from_state_dict(vcfg, sd, with_coca=coca, ignore_prefixes=())
    if model is None:  # weights missing: the strict load names them
        model = KimiVL(vcfg, with_coca=coca)
        model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval(), vcfg


class _Runner:
    """Shared state of one evaluation: model, prompts, generation."""

    def __init__(self, model, builder: PromptBuilder, generate_fn: GenerateFn, cfg: EvalConfig, device: str):
        self.model, self.builder, self.gen, self.cfg, self.device = model, builder, generate_fn, cfg, device
        self.dtype = next(model.parameters()).dtype
        self.new_tokens = 0

    def answer(self, ids: list[int], images: list[dict[str, Any]], max_new: int) -> str:
        pv, gh = self.builder.pixels(images)
        out = self.gen(
            self.model,
            torch.tensor(ids, dtype=torch.long, device=self.device),
            pixel_values=None if pv is None else pv.to(self.device, self.dtype),
            grid_hws=None if gh is None else gh.to(self.device),
            max_new_tokens=max_new,
            eos_ids=self.builder.eos_ids,
        )
        self.new_tokens += len(out.tokens)
        return self.builder.decode(out.tokens)

    def content(self, it: EvalItem) -> str:
        return it.question if self.builder.style == "chat" else it.plain

    def max_new(self, task: str) -> int:
        c = self.cfg
        return {"ocr": c.ocr_max_new_tokens, "math": c.math_max_new_tokens}.get(task, c.max_new_tokens)


def score(task: str, pred: str, it: EvalItem) -> tuple[dict[str, float], bool]:
    """(metrics of one answer, whether it counts as correct)."""
    a = it.answer
    if task == "vqa" or task == "video_qa":
        m = {"exact_match": M.exact_match(pred, a), "contains": M.contains_match(pred, a)}
        return m, m["exact_match"] == 1.0
    if task == "counting":
        m = {"accuracy": M.count_match(pred, a), "exact_match": M.exact_match(pred, a)}
        return m, m["accuracy"] == 1.0
    if task == "ocr":
        m = {
            "char_accuracy": M.char_accuracy(pred, a),
            "exact_match": float(" ".join(pred.split()) == " ".join(a.split())),
        }
        return m, m["exact_match"] == 1.0
    if task == "grounding":
        iou = M.grounding_iou(pred, it.meta["box"])
        return {"iou": iou, "acc_at_0.5": float(iou >= 0.5)}, iou >= 0.5
    if task in ("chart_qa", "doc_qa"):
        m = {
            "relaxed_accuracy": M.relaxed_match(pred, a),
            "exact_match": M.exact_match(pred, a),
            "contains": M.contains_match(pred, a),
        }
        return m, m["relaxed_accuracy"] == 1.0
    if task == "math":
        m = {"accuracy": M.math_correct(pred, float(a))}
        return m, m["accuracy"] == 1.0
    raise ValueError(f"no scorer for task {task!r}")


def _gen_task(r: _Runner, task: str, hs: HeldoutSet) -> dict[str, Any]:
    per: dict[str, list[float]] = {}
    failures = []
    for it in hs.items:
        content = r.content(it)
        pred = r.answer(r.builder.encode(content, it.images, it.media_kind), it.images, r.max_new(task))
        m, ok = score(task, pred, it)
        for k, v in m.items():
            per.setdefault(k, []).append(v)
        if not ok and len(failures) < r.cfg.max_failures:
            failures.append(
                {"id": it.id, "prompt": content[:500], "answer": it.answer, "prediction": pred, **m}
            )
    metrics = {k: M.mean(v) for k, v in per.items()}
    return {"metrics": {**metrics, "n": len(hs.items)}, "failures": failures}


def _loss_task(r: _Runner, hs: HeldoutSet) -> dict[str, Any]:
    doc_tok = DocTokenizer(r.builder.tok, r.builder.tcfg.model_copy(update={"add_eos": True}))
    docs = []
    for it in hs.items:
        row = doc_tok.tokenize(it.record)
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        mask = np.asarray(row["loss_mask"], dtype=bool) & (
            ids != r.builder.tok.special.media_end
        )  # caption text only
        pv, gh = r.builder.pixels(it.images)
        docs.append(M.LossDoc(torch.from_numpy(ids), torch.from_numpy(shifted_labels(ids, mask)), pv, gh))
    if not docs:
        return {"metrics": {"n": 0}, "failures": []}
    res = M.teacher_forced_loss(r.model, docs, batch_tokens=r.cfg.loss_batch_tokens, device=r.device)
    return {"metrics": {**res, "n": len(docs)}, "failures": []}


def _niah_task(r: _Runner, kind: str) -> dict[str, Any]:
    cfg = r.cfg.niah
    results = run_niah(kind, r.builder, cfg, r.answer, seed=r.cfg.seed)  # type: ignore[arg-type]
    s = summarize(results, cfg.lengths_for(kind), cfg.depths)
    failures = [
        {
            "id": f"niah_{kind}-{x['length']}-{x['depth']}",
            "prompt": f"{x['tokens']} tokens ({x['frames']} frames), needle at depth {x['actual_depth']:.3f}",
            "answer": x["needle"],
            "prediction": x["prediction"],
        }
        for x in results
        if not x["correct"]
    ][: r.cfg.max_failures]
    return {
        "metrics": {"recall": s["recall"], "n": s["n"]},
        "recall_by_bin": s["recall_by_bin"],
        "grid": s["grid"],
        "results": results,
        "failures": failures,
    }


def run_eval(
    checkpoint_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    cfg: EvalConfig | None = None,
    *,
    train_data_root: Path | None = None,
    generate_fn: GenerateFn | None = None,
    tracker: Any = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Evaluate one checkpoint; writes ``out_dir/{eval.json, report.md, niah_*.png}``; returns eval.json."""
    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model, vcfg = load_model(checkpoint_dir, device, dtype)
    tok = load_tokenizer(tokenizer_dir)
    check_model_ids(tok.describe(), vcfg, f"evaluating {checkpoint_dir}")
    add_bos = data_add_bos(train_data_root) if train_data_root is not None else True
    builder = PromptBuilder(tok, vcfg, cfg.prompt_style, add_bos=add_bos)
    runner = _Runner(model, builder, generate_fn or default_generate_fn(), cfg, device)
    index = TrainingIndex.from_data_root(train_data_root) if train_data_root is not None else None
    heldout: dict[str, Any] = {}
    with torch.no_grad():
        tasks = {task: _run_task(runner, task, index, heldout, log) for task in cfg.tasks}
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir),
        "tokenizer": str(tokenizer_dir),
        "model": vcfg.name,
        "rope_theta": vcfg.lm.rope_theta,
        "device": device,
        "config": cfg.model_dump(mode="json"),
        "train_data_root": None if train_data_root is None else str(train_data_root),
        "heldout": heldout,
        "heldout_overlap": None if index is None else sum(h["overlap"] or 0 for h in heldout.values()),
        "tasks": tasks,
    }
    result["summary"] = summary_metrics(result)
    result["plots"] = write_plots(result, out_dir)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(result, out_dir / "eval.json")
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(render_report(result))
    if tracker is not None:
        tracker.log_metrics(result["summary"], step=0)
        tracker.log_artifact(out_dir, name="eval")
    return result


def _run_task(
    runner: _Runner,
    task: str,
    index: TrainingIndex | None,
    heldout: dict[str, Any],
    log: Callable[[str], Any],
) -> dict[str, Any]:
    """One task: a held-out set (never overlapping the training data) scored by generation or teacher-forced
    loss, or a NIAH sweep; ``heldout`` collects each held-out set's summary."""
    cfg = runner.cfg
    ts, tok0 = time.perf_counter(), runner.new_tokens
    if task in HELDOUT_TASKS:
        hs = build_heldout(
            task, getattr(cfg.sizes, task), seed=cfg.seed, index=index, synth=cfg.synth_overrides()
        )
        heldout[task] = hs.summary()
        if hs.overlap:
            raise RuntimeError(f"held-out set {task!r} overlaps the training data ({hs.overlap} items)")
        res = _loss_task(runner, hs) if task in LOSS_TASKS else _gen_task(runner, task, hs)
    else:
        res = _niah_task(runner, task.removeprefix("niah_"))
    res["seconds"] = round(time.perf_counter() - ts, 3)
    res["generated_tokens"] = runner.new_tokens - tok0
    shown = {k: round(v, 4) for k, v in res["metrics"].items() if isinstance(v, float)}
    log(f"[eval] {task}: {shown} ({res['seconds']:.1f}s)")
    return res
