"""``kimivl data ...``: the data steps from the command line (also what dvc.yaml runs).

Every command validates the recipe first (a bad field exits 2 naming it) and then calls the same
``tasks.data.pipeline`` function the Prefect flow calls.
"""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli.common import RECIPE, console, emit, escape, load_recipe_or_exit, log

data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Data pipeline steps.")


def _guard(fn, *args):
    from tasks.data.io import DatasetError
    from tasks.io.manifest import ManifestError

    try:
        return fn(*args, log=log)
    except (FileNotFoundError, DatasetError, ManifestError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    except OSError as e:  # disk full, read-only or unwritable output: the step left no partial output
        console.print(f"[bold red]error:[/] cannot write the output: {escape(str(e))}")
        raise typer.Exit(1) from None


@data_app.command("all")
def data_all(
    recipe: Path = RECIPE, out: Path = typer.Option(Path("data"), "--out", help="data root")
) -> None:
    """Every data step: sources -> filter -> dedup (+QA) -> validate -> tokenizer -> tokenize."""
    from tasks.data.pipeline import run_data_all

    r = load_recipe_or_exit(recipe)
    emit(_guard(run_data_all, r.data, out))


@data_app.command("sources")
def data_sources(recipe: Path = RECIPE, out: Path = typer.Option(Path("data/raw"), "--out")) -> None:
    """Generate the synthetic corpus and ingest the recipe's user sources into OUT/<name>/."""
    from tasks.data.pipeline import step_sources

    emit(_guard(step_sources, load_recipe_or_exit(recipe).data, out))


@data_app.command("filter")
def data_filter(
    recipe: Path = RECIPE,
    inp: Path = typer.Option(Path("data/raw"), "--in"),
    out: Path = typer.Option(Path("data/filtered"), "--out"),
) -> None:
    """Quality rules; rejected rows go to OUT/<name>/quarantine with their reason."""
    from tasks.data.pipeline import step_filter

    emit(_guard(step_filter, load_recipe_or_exit(recipe).data, inp, out))


@data_app.command("dedup")
def data_dedup(
    recipe: Path = RECIPE,
    inp: Path = typer.Option(Path("data/filtered"), "--in"),
    out: Path = typer.Option(Path("data/dedup"), "--out"),
) -> None:
    """Exact + near-duplicate removal (kept aside in duplicates/), then rejection-sampled synthetic QA."""
    from tasks.data.pipeline import step_dedup

    emit(_guard(step_dedup, load_recipe_or_exit(recipe).data, inp, out))


@data_app.command("validate")
def data_validate(
    recipe: Path = RECIPE,
    inp: Path = typer.Option(Path("data/dedup"), "--in"),
    out: Path = typer.Option(Path("data/validated"), "--out"),
) -> None:
    """Great Expectations data contracts: accepted rows and quarantined rows with the failed expectation."""
    from tasks.data.pipeline import step_validate

    emit(_guard(step_validate, load_recipe_or_exit(recipe).data, inp, out))


@data_app.command("tokenizer")
def data_tokenizer(
    recipe: Path = RECIPE,
    inp: Path = typer.Option(Path("data/validated"), "--in"),
    out: Path = typer.Option(Path("data/tokenizer"), "--out"),
) -> None:
    """Train the byte-level BPE (fixed special-token ids) on the validated text."""
    from tasks.data.pipeline import step_tokenizer

    emit(_guard(step_tokenizer, load_recipe_or_exit(recipe).data, inp, out))


@data_app.command("tokenize")
def data_tokenize(
    recipe: Path = RECIPE,
    inp: Path = typer.Option(Path("data/validated"), "--in"),
    tokenizer: Path = typer.Option(Path("data/tokenizer"), "--tokenizer"),
    out: Path = typer.Option(Path("data/tokenized"), "--out"),
) -> None:
    """Tokenize every validated dataset (media blocks, ChatML masks) into tokenized shards."""
    from tasks.data.pipeline import step_tokenize

    emit(_guard(step_tokenize, load_recipe_or_exit(recipe).data, inp, tokenizer, out))


@data_app.command("ingest")
def data_ingest(
    src: Path = typer.Argument(..., help="file or directory of user data"),
    fmt: str = typer.Option(..., "--format", help="llava | coco | jsonl | webdataset | parquet"),
    out: Path = typer.Option(..., "--out", help="dataset directory to write"),
    source: str = typer.Option("user", "--source", help="dataset name written to each record's source"),
    image_root: Path | None = typer.Option(
        None,
        "--image-root",
        help="folder llava/coco image paths are relative to (default: the JSON's folder)",
    ),
    kind: str | None = typer.Option(
        None, "--kind", help="record kind for every row (default: the format's; parquet keeps each row's)"
    ),
    max_image_pixels: int | None = typer.Option(
        None, "--max-image-pixels", help="images with more pixels are quarantined (default 4096 x 4096)"
    ),
) -> None:
    """Ingest one user dataset in a standard format into a record dataset (formats: docs/DATA.md)."""
    from pydantic import ValidationError

    from tasks.data.ingest import IngestConfig, run_ingest
    from tasks.data.io import DatasetError

    try:
        extra = {"max_image_pixels": max_image_pixels} if max_image_pixels is not None else {}
        cfg = IngestConfig(format=fmt, source=source, image_root=image_root, kind=kind, **extra)
    except ValidationError as e:
        err = e.errors()[0]
        console.print(f"[bold red]error:[/] --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}")
        raise typer.Exit(2) from None
    try:
        m = run_ingest(src, out, cfg)
    except (FileNotFoundError, DatasetError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    emit(m.counts)
