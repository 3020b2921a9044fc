"""Running a recipe's phases from a process entry (the CLI in-process, or every launched rank): the
checks made before any work, the loop over phases, and what each failure means for the exit code.

- ``check_inputs``: the init checkpoint holds weights, the data root holds tokenized datasets
  (``FileNotFoundError`` naming the recipe field / directory);
- ``run_phases``: each phase through ``runner.run_phase`` (a ``JsonlTracker`` per phase under
  ``tracking_dir`` when given: a flow that launched these ranks relays rank 0's records from there);
- ``exit_code``: 2 for input a user must fix (missing parent phase or files, a busy phase, a model that
  cannot fit, a tokenizer whose ids the model does not read), 1 for training that stopped (divergence, a
  checkpoint that cannot be saved or loaded, a full disk), None for a bug (let it raise).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.data.pipeline import relative_note
from tasks.data.row_store import is_uri  # an s3:// data root: the loader checks each dataset
from tasks.data.text_tokenizer import TokenizerMismatchError
from tasks.io.weights import NATIVE_WEIGHTS
from tasks.recipe import Recipe
from tasks.tracking.local import JsonlTracker
from tasks.train.checkpoint import CheckpointError, DivergenceError
from tasks.train.memory import MemoryPlanError
from tasks.train.phase_lock import PhaseBusyError
from tasks.train.phase_model import MissingParentError
from tasks.train.runner import run_phase
from tasks.train.stages import PhaseConfig

USAGE_ERRORS = (
    MissingParentError,
    FileNotFoundError,
    PhaseBusyError,
    MemoryPlanError,
    TokenizerMismatchError,
)
STOPPED_ERRORS = (DivergenceError, CheckpointError)


def exit_code(e: BaseException) -> int | None:
    """The process exit code a failure of ``run_phases`` means (see the module docstring)."""
    if isinstance(e, USAGE_ERRORS):
        return 2
    if isinstance(e, (*STOPPED_ERRORS, OSError)):
        return 1
    return None


def check_inputs(recipe: Recipe, data_root: Path | None) -> None:
    """Before any phase: the init checkpoint has its weights and (``data_root`` given: the data steps ran
    before) the data root its tokenized datasets. A recipe field's error starts with ``field``."""
    init = recipe.model.init_checkpoint
    if init is not None and not (Path(init) / NATIVE_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"field model.init_checkpoint: {init} holds no {NATIVE_WEIGHTS}" + relative_note(Path(init))
        )
    if data_root is not None and not is_uri(data_root) and not (Path(data_root) / "tokenized").is_dir():
        raise FileNotFoundError(
            f"{Path(data_root) / 'tokenized'}: no tokenized data (run `kimivl data all` first)"
        )


def run_phases(
    recipe: Recipe,
    phases: list[PhaseConfig],
    data_root: Path,
    out_root: Path,
    tracking_dir: Path | None = None,
    log: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Every phase in order (each resumes from its last checkpoint, or is found complete)."""
    results = []
    for p in phases:
        tracker = JsonlTracker(Path(tracking_dir) / p.name) if tracking_dir is not None else None
        results.append(run_phase(recipe, p, data_root, out_root, tracker=tracker, log=log))
    return results
