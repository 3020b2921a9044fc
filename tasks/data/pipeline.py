"""The data half of the recipe as root-level steps: raw -> filtered -> dedup (+ synthetic QA) -> validated
-> tokenizer -> tokenized.

Each root-level step applies one ``tasks/data`` step to every dataset directory under its input root and
writes the same-named directory under its output root, so a dataset keeps its name (``caption``, ``text``,
``sft``, a user source name, ``synthetic_qa``) from raw data to tokenized shards, and stage mixtures refer
to those names. Every per-dataset call skips itself when its manifest is up to date, so a rerun with an
unchanged recipe does no work, and a changed rule reruns only what depends on it. The CLI
(``kimivl data STEP``), DVC stages and the Prefect data flow all call these functions.

Layout under the data root::

    raw/<name>/  filtered/<name>/  dedup/<name>/  validated/<name>/  tokenizer/  tokenized/<name>/
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks import Log
from tasks.data.dedup import DedupConfig, run_dedup
from tasks.data.filter import FilterConfig, run_filter
from tasks.data.ingest import IngestConfig, run_ingest
from tasks.data.qa_synthesis import QASynthConfig, run_qa_synthesis
from tasks.data.synth import SynthConfig, run_synth
from tasks.data.tokenize import TokenizeConfig, run_tokenize
from tasks.data.tokenizer import TokenizerConfig, run_train_tokenizer
from tasks.data.validate import ValidateConfig, run_validate
from tasks.io.manifest import MANIFEST_NAME, Manifest

LAYERS = ("raw", "filtered", "dedup", "validated", "tokenizer", "tokenized")
QA_NAME = "synthetic_qa"


def relative_note(path: Path) -> str:
    """Relative recipe paths resolve from the working directory (the repository root for `dvc repro` and
    the CLI's defaults), not from the recipe file's folder: say so where a relative path is not found."""
    return (
        "" if path.is_absolute() else f"; relative paths are resolved from the working directory {Path.cwd()}"
    )


class UserSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9_][a-z0-9_.-]*$", description="dataset name (a directory name)")
    path: Path = Field(description="file or directory with the user data")
    ingest: IngestConfig

    @model_validator(mode="after")
    def _exists(self) -> UserSource:
        # checked with the recipe, so a missing source stops the run before any data step writes anything
        if not self.path.exists():
            raise ValueError(
                f"path: {self.path} does not exist (source {self.name!r}){relative_note(self.path)}"
            )
        if self.ingest.format in ("llava", "coco") and not self.path.is_file():
            raise ValueError(
                f"path: the {self.ingest.format} format needs a JSON file, {self.path} is not one"
            )
        root = self.ingest.image_root
        if root is not None and not root.is_dir():
            raise ValueError(
                f"ingest.image_root: {root} is not a directory (source {self.name!r}){relative_note(root)}"
            )
        return self


class DataRecipe(BaseModel):
    """Every data step's config; the ``data:`` section of a recipe (params.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    sources: tuple[UserSource, ...] = Field(default=(), description="user datasets to ingest beside synth")
    filter: FilterConfig = Field(default_factory=FilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    qa: QASynthConfig = Field(default_factory=QASynthConfig)
    qa_enabled: bool = Field(default=True, description="add rejection-sampled synthetic QA (cooldown data)")
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)


def datasets(root: Path) -> list[Path]:
    """Completed dataset directories under ``root`` (those with a manifest), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data directory (run the previous step first)")
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST_NAME).is_file())


def _each(in_root: Path, out_root: Path, fn: Callable[[Path, Path], Manifest], log: Log, step: str) -> dict:
    out: dict[str, dict] = {}
    for d in datasets(in_root):
        t0 = time.perf_counter()
        m = fn(d, Path(out_root) / d.name)
        out[d.name] = m.counts
        log(f"[{step}] {d.name}: {_fmt_counts(m.counts)} ({time.perf_counter() - t0:.1f}s)")
    return out


def _fmt_counts(c: dict) -> str:
    keys = ("input", "accepted", "quarantined", "duplicates", "rows")
    return ", ".join(f"{k}={c[k]}" for k in keys if k in c)


def step_sources(recipe: DataRecipe, out_root: Path, log: Log = print) -> dict:
    """raw/: the synthetic corpus plus every user source."""
    out: dict[str, dict] = {}
    for name, m in run_synth(Path(out_root), recipe.synth).items():
        out[name] = m.counts
    for src in recipe.sources:
        m = run_ingest(src.path, Path(out_root) / src.name, src.ingest)
        out[src.name] = m.counts
        log(f"[ingest] {src.name}: {_fmt_counts(m.counts)}")
    log(
        f"[sources] {len(out)} datasets, {sum(c.get('rows', c.get('accepted', 0)) for c in out.values())} rows"
    )
    return out


def step_filter(recipe: DataRecipe, in_root: Path, out_root: Path, log: Log = print) -> dict:
    return _each(in_root, out_root, lambda i, o: run_filter(i, o, recipe.filter), log, "filter")


def step_dedup(recipe: DataRecipe, in_root: Path, out_root: Path, log: Log = print) -> dict:
    out = _each(in_root, out_root, lambda i, o: run_dedup(i, o, recipe.dedup), log, "dedup")
    if recipe.qa_enabled:
        inputs = [d for d in datasets(out_root) if d.name != QA_NAME]
        m = run_qa_synthesis(inputs, Path(out_root) / QA_NAME, recipe.qa)
        out[QA_NAME] = m.counts
        log(f"[qa] acceptance {m.counts.get('acceptance_rate')}, accepted {m.counts.get('accepted')}")
    return out


def step_validate(recipe: DataRecipe, in_root: Path, out_root: Path, log: Log = print) -> dict:
    return _each(in_root, out_root, lambda i, o: run_validate(i, o, recipe.validate_), log, "validate")


def step_tokenizer(recipe: DataRecipe, in_root: Path, out_dir: Path, log: Log = print) -> dict:
    t = recipe.tokenizer
    m = run_train_tokenizer(datasets(in_root) if t.source == "train" else [], Path(out_dir), t)
    how = "trained" if t.source == "train" else f"from {t.path}"
    log(f"[tokenizer] {how}, vocab {m.counts['vocab_size']}: {m.content_hash[:12]}")
    return m.counts


def step_tokenize(
    recipe: DataRecipe, in_root: Path, tokenizer_dir: Path, out_root: Path, log: Log = print
) -> dict:
    return _each(
        in_root, out_root, lambda i, o: run_tokenize(i, tokenizer_dir, o, recipe.tokenize), log, "tokenize"
    )


def run_data_all(recipe: DataRecipe, root: Path, log: Log = print) -> dict[str, Any]:
    """Every data step in order under ``root``; returns per-step, per-dataset counts."""
    root = Path(root)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {
        "raw": step_sources(recipe, root / "raw", log),
        "filtered": step_filter(recipe, root / "raw", root / "filtered", log),
        "dedup": step_dedup(recipe, root / "filtered", root / "dedup", log),
        "validated": step_validate(recipe, root / "dedup", root / "validated", log),
        "tokenizer": step_tokenizer(recipe, root / "validated", root / "tokenizer", log),
        "tokenized": step_tokenize(recipe, root / "validated", root / "tokenizer", root / "tokenized", log),
    }
    tokens = {"text": 0, "image": 0, "video": 0, "total": 0}
    for c in summary["tokenized"].values():
        for k in tokens:
            tokens[k] += int(c.get("tokens", {}).get(k, 0))
    summary["tokens"] = tokens
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
