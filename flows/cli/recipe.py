"""``kimivl recipe ...``: the recipe as DVC sees it (``tasks/dvc_pipeline.py``).

- ``split``: one settings file per phase and per evaluation point (what ``dvc.yaml``'s stages depend on);
- ``dvc``: render ``dvc.yaml`` from the recipe (``--write`` to replace it, ``--check`` to fail when the
  committed file is stale).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from flows.cli.common import RECIPE, console, escape, load_recipe_or_exit

recipe_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Recipe tools (DVC pipeline).")


@recipe_app.command("split")
def recipe_split(
    recipe: Path = RECIPE,
    out: Path = typer.Option(Path("runs/dvc/recipe"), "--out", help="directory of the settings files"),
) -> None:
    """Write phase-<name>.json and eval-<after>.json: the settings each DVC stage depends on."""
    from tasks.dvc_pipeline import split_recipe

    files = split_recipe(load_recipe_or_exit(recipe), out)
    sys.stdout.write(json.dumps({"files": [str(f) for f in files]}) + "\n")


@recipe_app.command("dvc")
def recipe_dvc(
    recipe: Path = RECIPE,
    dvc_file: Path = typer.Option(Path("dvc.yaml"), "--file", help="the dvc.yaml to write or check"),
    write: bool = typer.Option(False, "--write", help="replace --file with the rendered pipeline"),
    check: bool = typer.Option(False, "--check", help="exit 1 when --file differs from the rendering"),
) -> None:
    """Render dvc.yaml (data steps, recipe split, every phase, every evaluation point) from the recipe."""
    from tasks.dvc_pipeline import render_dvc_yaml
    from tasks.io.files import atomic_path

    text = render_dvc_yaml(load_recipe_or_exit(recipe), str(recipe))
    if check:
        current = dvc_file.read_text() if dvc_file.is_file() else ""
        if current != text:
            console.print(
                f"[bold red]stale:[/] {dvc_file} differs from `kimivl recipe dvc --recipe {recipe}`"
            )
            raise typer.Exit(1)
        console.print(f"{dvc_file} is current")
        return
    if write:
        with atomic_path(dvc_file) as tmp:
            tmp.write_text(text)
        console.print(f"wrote {dvc_file}")
        return
    sys.stdout.write(text)


@recipe_app.command("memory")
def recipe_memory(
    recipe: Path = RECIPE,
    world: int = typer.Option(1, "--world", min=1, help="training ranks (processes x nodes)"),
    device: str = typer.Option("cuda", "--device", help="cuda (bf16 under precision auto) or cpu"),
    device_memory: float | None = typer.Option(
        None, "--device-memory", min=0.0, help="GiB per rank (e.g. 79.1 for an H100 80GB): adds 'fits'"
    ),
) -> None:
    """Memory per rank of every phase: model states (weights, gradients, optimizer state, bf16 autocast
    copies; computed on the meta device) and the activations of its worst-case micro-batch (counted from
    the model code; the CoCa text decoder's not included); JSON on stdout. Exit 1 if a phase does not fit
    --device-memory."""
    from rich.table import Table

    from tasks.train.memory import GIB, plan_recipe

    if device not in ("cuda", "cpu"):
        console.print(f"[bold red]error:[/] --device: expected cuda or cpu, got {device!r}")
        raise typer.Exit(2)
    plans = plan_recipe(load_recipe_or_exit(recipe), world, device)
    cols = ("phase", "params", "trainable", "bf16", "weights", "grads", "optim", "autocast", "acts", "total")
    t = Table(title=f"memory per rank (GiB; acts: one micro-batch): {recipe}, {world} rank(s), {device}")

    def n(x: int) -> str:
        return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.1f}M"

    for c in (*cols, *(("fits",) if device_memory is not None else ())):
        t.add_column(c, justify="left" if c == "phase" else "right")
    rows, misfits = [], []
    for p in plans:
        fits = None if device_memory is None else p.total <= device_memory * GIB
        if fits is False:
            misfits.append(p.phase)
        gib = [
            f"{b / GIB:.2f}"
            for b in (p.weights, p.gradients, p.optimizer_state, p.autocast_copies, p.activations, p.total)
        ]
        t.add_row(
            p.phase,
            n(p.params),
            n(p.trainable),
            n(p.bf16_working_params),  # trainable matmul weights held in bf16 (train.working_weights)
            *gib,
            *(("yes" if fits else "NO",) if fits is not None else ()),
        )
        rows.append({**p.as_dict(), **({"fits": fits} if fits is not None else {})})
    console.print(t)
    sys.stdout.write(
        json.dumps({"recipe": str(recipe), "world": world, "device": device, "phases": rows}) + "\n"
    )
    if misfits:
        console.print(
            f"[bold red]does not fit {device_memory} GiB:[/] {', '.join(misfits)} (more ranks shrink only the "
            "optimizer state, and the gradients with ZeRO 2; gradient checkpointing or a shorter seq_len the "
            "activations)"
        )
        raise typer.Exit(1)


def dvc_remote_cmd(
    url: str = typer.Argument(..., help="s3://bucket/prefix"),
    endpoint_url: str | None = typer.Option(
        None,
        "--endpoint-url",
        help="S3-compatible endpoint (default: $KIMIVL_S3_ENDPOINT_URL / $AWS_ENDPOINT_URL)",
    ),
    repo: Path = typer.Option(Path("."), "--repo", help="the DVC repository"),
) -> None:
    """Make URL the default DVC remote (git-ignored local config; credentials stay in the environment)."""
    from tasks.io.dvc_remote import configure_dvc_remote
    from tasks.io.storage import StorageError

    try:
        configure_dvc_remote(repo, url, endpoint_url)
    except StorageError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    console.print(f"DVC remote 'storage' -> {url} (in {repo / '.dvc' / 'config.local'})")
