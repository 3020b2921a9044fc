"""The DVC pipeline of a recipe: ``dvc.yaml`` generated from the recipe, so it always lists every phase.

Stages (``kimivl recipe dvc`` renders them; the committed ``dvc.yaml`` is the tiny recipe's, and a test
checks it is current):

- ``data_*``: the data steps (sources -> filter -> dedup + QA -> validate -> tokenizer -> tokenize), each
  depending on its code and its own ``params.yaml`` section;
- ``recipe_split``: one small JSON per phase and per evaluation point holding exactly the settings that
  affect it (``phase-<name>.json``: the phase, model and engine settings; ``eval-<after>.json``: the point's
  ``EvalConfig``). DVC reruns a stage when one of its dependencies' bytes change, and a list element of
  ``params.yaml`` cannot be a DVC param on its own, so these files are how a changed ``sft.2`` budget
  reruns ``sft.2`` (and, through the checkpoint chain, the phases after it) and nothing before it;
- ``train_<phase>``: ``kimivl stage <phase>``, depending on the previous phase's output, the tokenized
  data, its split file and the model/training code;
- ``eval_<phase>``: ``kimivl eval`` of that phase's final checkpoint with its point's config; its flat
  summary is a DVC metrics file (``dvc metrics show`` / ``dvc metrics diff``).

Outputs live under ``RUN_DIR`` (``runs/dvc``) and ``data/``, are cached by DVC (``dvc push`` to the S3
remote that ``tasks.io.dvc_remote`` configures) and never go into git.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tasks.eval.points import INIT_POINT
from tasks.io.files import atomic_path
from tasks.io.manifest import canonical_json

RUN_DIR = "runs/dvc"
SPLIT_DIR = f"{RUN_DIR}/recipe"
DATA_DIR = "data"

_DATA_STAGES: list[tuple[str, str, list[str], list[str], str]] = [
    # (stage, command after `kimivl data`, code deps, params, output)
    (
        "data_sources",
        "sources --recipe {recipe} --out data/raw",
        ["tasks/data/synth.py", "tasks/data/synth_kinds.py", "tasks/data/synth_chat.py",
         "tasks/data/synth_render.py", "tasks/data/synth_text.py", "tasks/data/ingest.py",
         "tasks/data/ingest_readers.py", "tasks/data/ingest_binary.py", "tasks/data/ingest_common.py",
         "tasks/data/ingest_checks.py"],
        ["data.synth"],
        "data/raw",
    ),
    ("data_filter", "filter --recipe {recipe} --in data/raw --out data/filtered",
     ["data/raw", "tasks/data/filter.py"], ["data.filter"], "data/filtered"),
    ("data_dedup", "dedup --recipe {recipe} --in data/filtered --out data/dedup",
     ["data/filtered", "tasks/data/dedup.py", "tasks/data/qa_synthesis.py", "tasks/data/qa_facts.py",
      "tasks/data/qa_passage.py"],
     ["data.dedup", "data.qa", "data.qa_enabled"], "data/dedup"),
    ("data_validate", "validate --recipe {recipe} --in data/dedup --out data/validated",
     ["data/dedup", "data_contracts", "tasks/data/validate.py"], ["data.validate"], "data/validated"),
    ("data_tokenizer", "tokenizer --recipe {recipe} --in data/validated --out data/tokenizer",
     ["data/validated", "tasks/data/tokenizer.py", "tasks/data/text_tokenizer.py"], ["data.tokenizer"],
     "data/tokenizer"),
    ("data_tokenize",
     "tokenize --recipe {recipe} --in data/validated --tokenizer data/tokenizer --out data/tokenized",
     ["data/validated", "data/tokenizer", "tasks/data/tokenize.py", "tasks/data/chat_format.py",
      "tasks/data/text_tokenizer.py", "tasks/data/special_tokens.py"], ["data.tokenize"], "data/tokenized"),
]  # fmt: skip

TRAIN_CODE = ["kimivl_model", "tasks/train", "tasks/data/loader.py", "tasks/data/pack.py"]
EVAL_CODE = ["kimivl_model", "tasks/eval"]


def stage_key(name: str) -> str:
    """A DVC stage name for a phase (DVC names allow letters, digits, ``_`` and ``-``)."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)


def phase_settings(recipe: Any, phase_name: str) -> dict[str, Any]:
    """Everything that changes what training ``phase_name`` produces (besides its inputs' bytes)."""
    return {
        "phase": recipe.phase(phase_name).model_dump(mode="json", by_alias=True),
        "model": recipe.model.model_dump(mode="json", by_alias=True),
        "train": recipe.train.model_dump(mode="json", by_alias=True),
    }


def split_recipe(recipe: Any, out_dir: Path | str) -> list[Path]:
    """Write ``phase-<name>.json`` and ``eval-<after>.json`` under ``out_dir`` (canonical JSON, atomic);
    files of phases/points no longer in the recipe are removed. Returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {
        f"phase-{p.name}.json": canonical_json(phase_settings(recipe, p.name)) for p in recipe.phases
    }
    for pt in recipe.eval.points:
        files[f"eval-{pt.after}.json"] = canonical_json(recipe.eval.point_config(pt).model_dump(mode="json"))
    for old in out.glob("*.json"):
        if old.name not in files:
            old.unlink()
    written = []
    for name, text in sorted(files.items()):
        path = out / name
        if not path.is_file() or path.read_text() != text + "\n":
            with atomic_path(path) as tmp:
                tmp.write_text(text + "\n")
        written.append(path)
    return written


def render_dvc_yaml(recipe: Any, recipe_path: str = "params.yaml") -> str:
    """The ``dvc.yaml`` text for ``recipe`` (stored at ``recipe_path``, relative to the repository root)."""
    stages: dict[str, Any] = {}
    for name, cmd, deps, params, out in _DATA_STAGES:
        tok = recipe.data.tokenizer
        if name == "data_tokenizer" and tok.source == "checkpoint":  # the checkpoint's files, not the corpus
            deps = [str(tok.path), *deps[1:]]
        stages[name] = {
            "cmd": f"kimivl data {cmd.format(recipe=recipe_path)}",
            "deps": deps,
            "params": [{recipe_path: params}] if recipe_path != "params.yaml" else params,
            "outs": [out],
        }
    split_outs = [f"{SPLIT_DIR}/phase-{p.name}.json" for p in recipe.phases]
    split_outs += [f"{SPLIT_DIR}/eval-{pt.after}.json" for pt in recipe.eval.points]
    stages["recipe_split"] = {
        "cmd": f"kimivl recipe split --recipe {recipe_path} --out {SPLIT_DIR}",
        "deps": [recipe_path, "tasks/recipe.py", "tasks/dvc_pipeline.py"],
        "outs": [{o: {"cache": False}} for o in split_outs],
    }
    prev: str | None = None
    for p in recipe.phases:
        deps = [f"{SPLIT_DIR}/phase-{p.name}.json", f"{DATA_DIR}/tokenized", *TRAIN_CODE]
        if prev is not None and p.init_from != "scratch":
            deps.insert(0, f"{RUN_DIR}/phases/{prev}")
        if prev is None and recipe.model.init_checkpoint is not None:
            deps.insert(0, str(recipe.model.init_checkpoint))
        stages[f"train_{stage_key(p.name)}"] = {
            "cmd": f"kimivl stage {p.name} --recipe {recipe_path} --data {DATA_DIR} --out {RUN_DIR}",
            "deps": deps,
            "outs": [f"{RUN_DIR}/phases/{p.name}"],
        }
        prev = p.name
    for pt in recipe.eval.points:
        ckpt = str(recipe.model.init_checkpoint) if pt.after == INIT_POINT else f"{RUN_DIR}/phases/{pt.after}"
        stages[f"eval_{stage_key(pt.after)}"] = {
            "cmd": (
                f"kimivl eval --checkpoint {ckpt} --tokenizer {DATA_DIR}/tokenizer --train-data {DATA_DIR} "
                f"--config {SPLIT_DIR}/eval-{pt.after}.json --out {RUN_DIR}/eval/{pt.after} "
                f"--metrics {RUN_DIR}/metrics/eval-{pt.after}.json"
            ),
            "deps": [ckpt, f"{SPLIT_DIR}/eval-{pt.after}.json", f"{DATA_DIR}/tokenizer",
                     f"{DATA_DIR}/validated", f"{DATA_DIR}/tokenized", *EVAL_CODE],
            "outs": [f"{RUN_DIR}/eval/{pt.after}"],
            "metrics": [{f"{RUN_DIR}/metrics/eval-{pt.after}.json": {"cache": False}}],
        }  # fmt: skip
    head = (
        "# Generated by `kimivl recipe dvc --recipe "
        f"{recipe_path}` from the recipe (tasks/dvc_pipeline.py); do not edit by hand.\n"
        "# `dvc repro` reproduces the pipeline (data -> every phase -> evaluation points) and reruns only\n"
        "# what a changed parameter or code dependency affects. Put .venv/bin on PATH first.\n"
    )
    return head + yaml.safe_dump({"stages": stages}, sort_keys=False, width=110)
