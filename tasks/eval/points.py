"""Evaluation inside the pipeline: the recipe's ``eval`` section names the phases after which the model is
evaluated and which tasks run there; one run report compares the points.

Where the points sit in the tiny/a3b recipes (REFERENCE.md, Kimi-VL sections 2.3 and 3):

- after ``text_pretrain`` (the given text LM): held-out text loss and math, the "before" of text
  retention and of reasoning;
- after ``cooldown``: the multimodal skills, text loss (the "after" of text retention, the paper's claim
  that joint training preserves text ability) and NIAH at the pre-extension context;
- after the last ``long_context`` phase: NIAH again, so the context extension is visible (Table 2);
- after the last ``sft`` phase and after ``cot_sft``: math accuracy before and after long-CoT SFT.

Each point evaluates that phase's final checkpoint into ``OUT/eval/<phase>/`` (``eval.json``, plots,
``report.md``) and writes a manifest whose parent is the checkpoint and whose config is the point's
``EvalConfig``: an unchanged point is up to date and skipped (a resumed pipeline does not re-evaluate).
The point directory appears only complete (made in a staging directory, then renamed).

``pipeline_report`` writes ``OUT/eval/report.md`` and ``OUT/eval/eval.json``: every summary metric per
point side by side, plus the three before/after comparisons the issue asks for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks import Log
from tasks.eval.suite import TASKS, EvalConfig, GenerateFn, run_eval
from tasks.io.faults import crash_point
from tasks.io.files import atomic_path, write_json_atomic
from tasks.io.manifest import (
    dir_parent,
    is_up_to_date,
    write_manifest,
)

EVAL_DIR = "eval"
INIT_POINT = "init"  # ``after: init`` evaluates model.init_checkpoint (a3b: the imported text LM)


class EvalPoint(BaseModel):
    """Evaluate the final checkpoint of phase ``after`` on ``tasks`` (default: every task)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    after: str = Field(
        description="phase name whose final checkpoint is evaluated, or 'init' for model.init_checkpoint"
    )
    tasks: tuple[str, ...] = Field(TASKS, description=f"subset of {TASKS}")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"unknown tasks {bad} (expected a non-empty subset of {list(TASKS)})")
        return tasks


class RecipeEval(BaseModel):
    """The recipe's ``eval`` section: shared settings and the points (checked against the phases)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="run the points in the pipeline (kimivl eval works regardless)")
    config: EvalConfig = Field(default_factory=EvalConfig, description="sizes, NIAH bins, generation")
    points: tuple[EvalPoint, ...] = Field(default=(), description="evaluation points in recipe order")

    def points_after(self, phase: str) -> list[EvalPoint]:
        return [p for p in self.points if p.after == phase] if self.enabled else []

    def point_config(self, point: EvalPoint) -> EvalConfig:
        return self.config.model_copy(update={"tasks": point.tasks})


def point_dir(out_root: Path, point: EvalPoint) -> Path:
    return Path(out_root) / EVAL_DIR / point.after


def run_point(
    settings: RecipeEval,
    point: EvalPoint,
    checkpoint: Path,
    data_root: Path,
    out_root: Path,
    *,
    generate_fn: GenerateFn | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Evaluate one point (or find it up to date); returns its ``eval.json`` plus ``dir`` / ``up_to_date``."""
    cfg = settings.point_config(point)
    dst = point_dir(out_root, point)
    parent = dir_parent(Path(checkpoint))
    config = {"eval": cfg.model_dump(mode="json"), "after": point.after}
    if is_up_to_date(dst, config=config, parents=[parent]):
        log(f"[eval] after {point.after}: up to date ({dst})")
        return {**json.loads((dst / "eval.json").read_text()), "dir": str(dst), "up_to_date": True}
    stage = dst.parent / f".{dst.name}.staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    res = run_eval(
        checkpoint,
        Path(data_root) / "tokenizer",
        stage,
        cfg,
        train_data_root=Path(data_root),
        generate_fn=generate_fn,
        log=log,
    )
    # eval.json names the directory it was written to: point it at the final place before hashing
    res["plots"] = [str(dst / Path(p).name) for p in res.get("plots", [])]
    res["after"] = point.after
    write_json_atomic(res, stage / "eval.json")
    write_manifest(
        stage,
        kind="eval",
        step=f"eval:{point.after}",
        config=config,
        parents=[parent],
        counts={"tasks": len(cfg.tasks), "metrics": len(res["summary"])},
    )
    crash_point("eval:before_rename")
    shutil.rmtree(dst, ignore_errors=True)
    stage.replace(dst)
    return {**res, "dir": str(dst), "up_to_date": False}


# ------------------------------------------------------------------------------------------ report

# (title, metric, before phase stage, after phase stage, what the paper claims)
COMPARISONS = (
    ("Text retention", "text_loss/loss", "text_pretrain", "cooldown", "joint training keeps text ability"),
    ("Long context (NIAH text)", "niah_text/recall", "cooldown", "long_context", "extension lifts recall"),
    ("Long context (NIAH video)", "niah_video/recall", "cooldown", "long_context", "extension lifts recall"),
    ("Reasoning (math)", "math/accuracy", "sft", "cot_sft", "long-CoT SFT lifts verified accuracy"),
)


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def _point_for_stage(points: dict[str, dict[str, Any]], stage_of: dict[str, str], stage: str) -> str | None:
    """The last evaluated phase of ``stage`` (e.g. long_context.2 for long_context)."""
    found = [name for name in points if stage_of.get(name) == stage]
    return found[-1] if found else None


def render_pipeline_report(
    recipe_name: str, points: dict[str, dict[str, Any]], stage_of: dict[str, str], at: Path | None = None
) -> str:
    """Markdown: the before/after comparisons, then every summary metric per evaluation point. The
    per-point reports are relative links (the file next to them), or with ``at`` their absolute paths
    as text (where the Markdown is shown elsewhere: a relative link in a Prefect artifact opens a 404)."""
    lines = [f"# Evaluation of recipe `{recipe_name}`", ""]
    if not points:
        return "\n".join([*lines, "No evaluation points ran.", ""])
    lines += [
        "## Before / after",
        "",
        "| comparison | metric | before | after | change | claim |",
        "|---|---|---|---|---|---|",
    ]
    for title, metric, s_before, s_after, claim in COMPARISONS:
        b, a = _point_for_stage(points, stage_of, s_before), _point_for_stage(points, stage_of, s_after)
        vb = points[b]["summary"].get(metric) if b else None
        va = points[a]["summary"].get(metric) if a else None
        delta = None if vb is None or va is None else va - vb
        lines.append(
            f"| {title} | `{metric}` | {_fmt(vb)} ({b or 'not evaluated'}) | {_fmt(va)} ({a or 'not evaluated'}) "
            f"| {'–' if delta is None else f'{delta:+.4f}'} | {claim} |"
        )
    names = list(points)
    metrics = sorted({k for p in points.values() for k in p["summary"]})
    lines += ["", "## Every metric per evaluation point", ""]
    lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in metrics:
        lines.append(f"| `{m}` | " + " | ".join(_fmt(points[n]["summary"].get(m)) for n in names) + " |")
    per_point = [f"[{n}]({n}/report.md)" if at is None else f"`{Path(at) / n / 'report.md'}`" for n in names]
    lines += ["", "Per-point reports (tables per task, NIAH heatmaps, failures): " + ", ".join(per_point), ""]
    return "\n".join(lines)


def pipeline_report(
    recipe_name: str, points: dict[str, dict[str, Any]], stage_of: dict[str, str], out_root: Path
) -> dict[str, Any]:
    """Write ``OUT/eval/report.md`` and ``OUT/eval/eval.json`` (summaries per point); returns both, and
    ``artifact_markdown``: the report naming the per-point reports by absolute path (for Prefect)."""
    root = Path(out_root) / EVAL_DIR
    root.mkdir(parents=True, exist_ok=True)
    md = render_pipeline_report(recipe_name, points, stage_of)
    with atomic_path(root / "report.md") as tmp:
        tmp.write_text(md)
    combined = {
        "recipe": recipe_name,
        "points": {
            n: {"dir": p.get("dir"), "checkpoint": p.get("checkpoint"), "summary": p["summary"]}
            for n, p in points.items()
        },
    }
    write_json_atomic(combined, root / "eval.json")
    shown = render_pipeline_report(recipe_name, points, stage_of, at=root.resolve())
    return {"markdown": md, "artifact_markdown": shown, "json": combined, "report": str(root / "report.md")}
