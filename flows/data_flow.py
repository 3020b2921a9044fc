"""The data flow: the data half of the recipe as Prefect tasks, in recipe order.

sources -> filter -> dedup (+ synthetic QA) -> validate -> tokenizer -> tokenize

Each task calls the same root-level step of ``tasks.data.pipeline`` that the CLI and DVC call. The steps
are I/O-bound, so each retries with exponential backoff on transient errors. Every per-dataset call skips
itself when its output manifest already matches its inputs; the task surfaces that as an "up to date"
line per dataset (a manifest that was not rewritten) and lists those datasets in its report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# isort: off
from flows import prefect_common as pc  # sets Prefect's environment defaults: import it first

# isort: on
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from tasks.data import pipeline as steps
from tasks.data.pipeline import DataRecipe
from tasks.io.manifest import MANIFEST_NAME


class DataParams(BaseModel):
    """The data flow's parameters (a validated form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")
    recipe_path: str = Field(default="params.yaml", description="recipe YAML; its `data:` section is used")
    data_dir: str = Field(default="runs/tiny/data", description="data root: raw/ ... tokenized/ go here")
    io_retries: int = Field(
        default=3, ge=0, le=10, description="retries per step on transient I/O errors; 0 to 10"
    )


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of the manifest of ``root`` ('.') and of each dataset directly under it."""
    out: dict[str, tuple[int, int]] = {}
    for name, m in [(".", root / MANIFEST_NAME), *((d.name, d / MANIFEST_NAME) for d in _subdirs(root))]:
        if m.is_file():
            st = m.stat()
            out[name] = (st.st_ino, st.st_mtime_ns)
    return out


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def run_step(name: str, out_root: Path, fn: Callable[[pc.Log], dict]) -> dict[str, Any]:
    """Run one root-level step; report which outputs were up to date (their manifest was not rewritten)."""
    log = pc.run_log()
    before = _stamps(out_root)
    counts = fn(log)
    after = _stamps(out_root)
    fresh = sorted(n for n, s in after.items() if before.get(n) == s)
    written = sorted(n for n in after if n not in fresh)
    for n in fresh:
        log(f"[{name}] {out_root.name if n == '.' else n}: up to date (skipped)")
    if not written:
        log(f"[{name}] up to date: nothing to do")
    return {"counts": counts, "up_to_date": fresh, "written": written}


@task(name="sources", task_run_name="sources", **pc.io_task_options())
def sources(recipe: DataRecipe, root: Path) -> dict[str, Any]:
    return run_step("sources", root / "raw", lambda log: steps.step_sources(recipe, root / "raw", log))


@task(name="filter", task_run_name="filter", **pc.io_task_options())
def filter_(recipe: DataRecipe, root: Path) -> dict[str, Any]:
    return run_step(
        "filter",
        root / "filtered",
        lambda log: steps.step_filter(recipe, root / "raw", root / "filtered", log),
    )


@task(name="dedup", task_run_name="dedup + QA synthesis", **pc.io_task_options())
def dedup(recipe: DataRecipe, root: Path) -> dict[str, Any]:
    return run_step(
        "dedup", root / "dedup", lambda log: steps.step_dedup(recipe, root / "filtered", root / "dedup", log)
    )


@task(name="validate", task_run_name="validate", **pc.io_task_options())
def validate(recipe: DataRecipe, root: Path) -> dict[str, Any]:
    return run_step(
        "validate",
        root / "validated",
        lambda log: steps.step_validate(recipe, root / "dedup", root / "validated", log),
    )


@task(name="tokenizer", task_run_name="train tokenizer", **pc.io_task_options())
def tokenizer(recipe: DataRecipe, root: Path) -> dict[str, Any]:
    return run_step(
        "tokenizer",
        root / "tokenizer",
        lambda log: steps.step_tokenizer(recipe, root / "validated", root / "tokenizer", log),
    )


@task(name="tokenize", task_run_name="tokenize", **pc.io_task_options())
def tokenize(recipe: DataRecipe, root: Path) -> dict[str, Any]:
    return run_step(
        "tokenize",
        root / "tokenized",
        lambda log: steps.step_tokenize(
            recipe, root / "validated", root / "tokenizer", root / "tokenized", log
        ),
    )


def load_recipe_checked(path: str | Path):
    """The validated recipe (``RecipeError`` names the file and field)."""
    from tasks.recipe import load_recipe

    return load_recipe(path)


def data_tokens(tokenized_counts: dict[str, dict]) -> dict[str, int]:
    tokens = {"text": 0, "image": 0, "video": 0, "total": 0}
    for c in tokenized_counts.values():
        for k in tokens:
            tokens[k] += int(c.get("tokens", {}).get(k, 0))
    return tokens


def _data_table(tokenized_counts: dict[str, dict]) -> str:
    lines = ["| dataset | documents | text | image | video | total |", "|---|---|---|---|---|---|"]
    for name, c in sorted(tokenized_counts.items()):
        t = c.get("tokens", {})
        lines.append(
            f"| {name} | {c.get('accepted', c.get('rows', '-'))} | {t.get('text', 0):,} | {t.get('image', 0):,} | "
            f"{t.get('video', 0):,} | {t.get('total', 0):,} |"
        )
    return "\n".join(lines) + "\n"


@flow(name="kimivl-data", log_prints=True)
def data_flow(params: DataParams = DataParams()) -> dict[str, Any]:
    """raw -> filtered -> dedup (+QA) -> validated -> tokenizer -> tokenized, under ``params.data_dir``.

    Returns the same per-step counts as ``run_data_all`` plus ``tokens`` (totals by modality) and
    ``up_to_date`` (per step, the outputs that were already current and skipped).
    """
    recipe = load_recipe_checked(params.recipe_path).data
    root = Path(params.data_dir)
    opts = {"retries": params.io_retries}
    reports = {
        "raw": sources.with_options(**opts)(recipe, root),
        "filtered": filter_.with_options(**opts)(recipe, root),
        "dedup": dedup.with_options(**opts)(recipe, root),
        "validated": validate.with_options(**opts)(recipe, root),
        "tokenizer": tokenizer.with_options(**opts)(recipe, root),
        "tokenized": tokenize.with_options(**opts)(recipe, root),
    }
    summary: dict[str, Any] = {k: r["counts"] for k, r in reports.items()}
    summary["tokens"] = data_tokens(summary["tokenized"])
    summary["up_to_date"] = {k: r["up_to_date"] for k, r in reports.items()}
    create_markdown_artifact(
        key=pc.artifact_key("kimivl", "data", "tokens"),
        markdown=f"# Tokenized data under `{root}`\n\n{_data_table(summary['tokenized'])}",
        description="tokens per tokenized dataset",
    )
    return summary
