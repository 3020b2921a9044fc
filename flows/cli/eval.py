"""``kimivl eval``: evaluate a checkpoint (held-out synthetic tasks, NIAH) -> eval.json, plots, report.md.

Thin: it builds an ``EvalConfig`` from an optional YAML/JSON file plus command-line overrides and calls
``tasks.eval.suite.run_eval``. Invalid input prints one line naming what is wrong and exits 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from flows.cli.common import console, fail, log


def _numbers(text: str, cast, name: str) -> tuple:
    try:
        return tuple(cast(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"{name}: expected comma-separated numbers, got {text!r}")
        raise  # unreachable


def _config(
    config: Path | None,
    tasks: str,
    niah_lengths: str | None,
    niah_video_lengths: str | None,
    niah_depths: str | None,
    max_items: int | None,
    prompt_style: str | None,
    seed: int | None,
    device: str | None,
):
    import yaml
    from pydantic import ValidationError

    from tasks.eval.suite import TASKS, EvalConfig

    raw: dict = {}
    if config is not None:
        if not config.is_file():
            fail(f"--config: {config} does not exist")
        raw = yaml.safe_load(config.read_text()) or {}
        if not isinstance(raw, dict):
            fail(f"--config: {config} must hold a mapping of EvalConfig fields")
    if tasks != "all":
        raw["tasks"] = [t.strip() for t in tasks.split(",") if t.strip()]
        unknown = [t for t in raw["tasks"] if t not in TASKS]
        if unknown:
            fail(f"--tasks: unknown {unknown} (expected 'all' or some of {', '.join(TASKS)})")
    niah = dict(raw.get("niah") or {})
    if niah_lengths:
        niah["lengths"] = _numbers(niah_lengths, int, "--niah-lengths")
    if niah_video_lengths:
        niah["video_lengths"] = _numbers(niah_video_lengths, int, "--niah-video-lengths")
    if niah_depths:
        niah["depths"] = _numbers(niah_depths, float, "--niah-depths")
    if niah:
        raw["niah"] = niah
    for key, val in (("prompt_style", prompt_style), ("seed", seed), ("device", device)):
        if val is not None:
            raw[key] = val
    try:
        cfg = EvalConfig.model_validate(raw)
        if max_items is not None:
            sizes = {k: min(v, max_items) for k, v in cfg.sizes.model_dump().items()}
            cfg = EvalConfig.model_validate({**cfg.model_dump(), "sizes": sizes})
    except ValidationError as e:
        err = e.errors()[0]
        fail(f"eval config: field {'.'.join(map(str, err['loc']))}: {err['msg']}")
    return cfg


def eval_cmd(
    checkpoint: str = typer.Option(
        ...,
        "--checkpoint",
        help="native checkpoint dir (or a phase dir with final/), or s3://... (a published checkpoint)",
    ),
    out: Path = typer.Option(..., "--out", help="output dir for eval.json, report.md and the NIAH plots"),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="tokenizer dir (DATA/tokenizer)"),
    tasks: str = typer.Option(
        "all", "--tasks", help="'all' or a comma-separated subset, e.g. niah_text,math"
    ),
    config: Path | None = typer.Option(None, "--config", help="YAML/JSON file of EvalConfig fields"),
    train_data: Path | None = typer.Option(
        None,
        "--train-data",
        help="training data root: held-out sets are checked against it (overlap must be 0)",
    ),
    niah_lengths: str | None = typer.Option(
        None, "--niah-lengths", help="text haystacks, e.g. 1024,2048,4096,8192"
    ),
    niah_video_lengths: str | None = typer.Option(
        None, "--niah-video-lengths", help="video haystacks, e.g. 1024,2048,4096"
    ),
    niah_depths: str | None = typer.Option(None, "--niah-depths", help="e.g. 0,0.25,0.5,0.75,1"),
    max_items: int | None = typer.Option(None, "--max-items", min=0, help="cap on items per held-out task"),
    prompt_style: str | None = typer.Option(None, "--prompt-style", help="chat | plain"),
    seed: int | None = typer.Option(None, "--seed", min=0),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
    compare: Path | None = typer.Option(
        None, "--compare", help="an earlier eval.json: also write compare.md"
    ),
    metrics: Path | None = typer.Option(
        None, "--metrics", help="also write the flat summary metrics to this JSON file (DVC metrics)"
    ),
) -> None:
    """Evaluate a checkpoint: held-out VQA/counting/OCR/grounding/chart/doc/video/math, caption and text
    loss, text and video needle-in-a-haystack; writes OUT/eval.json, OUT/report.md and NIAH plots."""
    from tasks.eval.suite import run_eval

    cfg = _config(
        config, tasks, niah_lengths, niah_video_lengths, niah_depths, max_items, prompt_style, seed, device
    )
    ckpt = checked_inputs(checkpoint, tokenizer, train_data, out)
    earlier = None
    if compare is not None:
        try:
            earlier = json.loads(compare.read_text())
        except (OSError, ValueError) as e:
            fail(f"--compare: {compare}: {e}")
    result = run_eval(ckpt, tokenizer, out, cfg, train_data_root=train_data, log=log)
    write_outputs(result, ckpt, out, metrics, earlier, compare)


def checked_inputs(checkpoint: str, tokenizer: Path, train_data: Path | None, out: Path) -> Path:
    """The local checkpoint (a published s3:// one fetched and verified), checked with its tokenizer."""
    from tasks.data.text_tokenizer import check_model_ids, load_tokenizer
    from tasks.eval.suite import resolve_checkpoint
    from tasks.io.weights import read_native_config

    if checkpoint.startswith("s3://"):
        from tasks.io.publish import fetch_dir
        from tasks.io.storage import StorageError

        try:
            checkpoint = str(fetch_dir(checkpoint, out / ".fetched"))
        except StorageError as e:
            fail(f"--checkpoint: {e}")
    ckpt = Path(checkpoint)
    try:
        resolve_checkpoint(ckpt)
    except FileNotFoundError as e:
        fail(str(e))
    try:  # a tokenizer the model cannot read stops here, naming both values
        tok = load_tokenizer(tokenizer)
        check_model_ids(tok.describe(), read_native_config(resolve_checkpoint(ckpt)), "--tokenizer")
    except (OSError, ValueError) as e:
        fail(f"--tokenizer: {e}")
    if train_data is not None and not train_data.is_dir():
        fail(f"--train-data: {train_data} is not a directory")
    return ckpt


def write_outputs(
    result: dict, ckpt: Path, out: Path, metrics: Path | None, earlier: dict | None, compare: Path | None
) -> None:
    from tasks.eval.suite import compare_reports
    from tasks.io.files import atomic_path, write_json_atomic

    if metrics is not None:
        write_json_atomic(result["summary"], metrics)
    if earlier is not None and compare is not None:
        with atomic_path(out / "compare.md") as tmp:
            tmp.write_text(compare_reports(earlier, result, names=(str(compare.parent.name), str(out.name))))
    table = Table(title=f"eval {ckpt}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["summary"].items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    console.print(f"wrote {out / 'eval.json'}, {out / 'report.md'}")
    sys.stdout.write(json.dumps({"out": str(out), "summary": result["summary"]}, sort_keys=True) + "\n")
