"""``kimivl model ...`` (presets, checkpoints: init, import, export) and ``kimivl smoke``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from flows.cli.common import console, fail, log

model_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Model library: presets, checkpoints."
)


def _preset(name: str):
    from kimivl_model.config import ConfigError, preset

    try:
        return preset(name)
    except ConfigError as e:
        fail(str(e))


@model_app.command("summary")
def model_summary_cmd(
    preset_name: str = typer.Option("tiny", "--preset", help="tiny | small | a3b"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Parameter counts of a preset, built on the meta device (no memory is allocated)."""
    from kimivl_model.summary import model_summary

    cfg = _preset(preset_name)
    s = model_summary(cfg)
    if as_json:
        sys.stdout.write(json.dumps(s, sort_keys=True) + "\n")
        return
    table = Table(title=f"kimivl preset {preset_name}")
    table.add_column("component")
    table.add_column("params", justify="right")
    for k, v in s.items():
        if isinstance(v, int):
            table.add_row(k, f"{v:,}")
    Console().print(table)


@model_app.command("init")
def model_init_cmd(
    out: Path = typer.Option(..., "--out", help="native checkpoint directory to write"),
    preset_name: str = typer.Option("tiny", "--preset"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a freshly initialised model of a preset as a native safetensors checkpoint."""
    import torch

    from kimivl_model.vlm import KimiVL
    from tasks.io.weights import save_native

    cfg = _preset(preset_name)
    if cfg.name == "a3b":
        fail("--preset a3b: initialising 16B parameters on this machine is not supported; use import")
    torch.manual_seed(seed)
    model = KimiVL(cfg)
    save_native(model.state_dict(), cfg, out)
    console.print(f"wrote {out}")


@model_app.command("import")
def model_import_cmd(
    hf_dir: Path = typer.Argument(
        ..., help="directory with config.json + *.safetensors (public Kimi-VL layout) and its tokenizer"
    ),
    out: Path = typer.Option(..., "--out", help="native checkpoint directory to write"),
) -> None:
    """Convert a public-layout Kimi-VL checkpoint into this library's native checkpoint; its tokenizer
    (tiktoken.model or tokenizer.json + tokenizer_config.json) comes along in OUT/tokenizer/, ready for a
    recipe's `data.tokenizer: from_checkpoint`."""
    from kimivl_model.hf_interop import CheckpointLayoutError
    from tasks.io.weights import TOKENIZER_DIR, import_public

    try:
        _, n = import_public(hf_dir, out)
    except (FileNotFoundError, CheckpointLayoutError, ValueError) as e:
        fail(str(e))
    tok = "with its tokenizer" if (out / TOKENIZER_DIR).is_dir() else "WITHOUT a tokenizer (none found)"
    console.print(f"imported {hf_dir} -> {out} ({n} tensors, {tok})")


@model_app.command("export")
def model_export_cmd(
    checkpoint: Path = typer.Argument(..., help="native checkpoint directory"),
    out: Path = typer.Option(..., "--out", help="directory for the public Kimi-VL layout"),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="tokenizer directory to ship with it (default: CHECKPOINT/tokenizer if any)"
    ),
    assets: Path | None = typer.Option(
        None,
        "--assets",
        help="an import's hf_assets/ (original config.json etc.; default: CHECKPOINT/hf_assets)",
    ),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (the original's torch_dtype, else float32) | float32 | bfloat16"
    ),
    max_shard_gb: float = typer.Option(5.0, "--max-shard-gb"),
) -> None:
    """Convert a native checkpoint to the public Kimi-VL layout (config.json + sharded safetensors + tokenizer)."""
    from tasks.io.weights import ASSETS_DIR, TOKENIZER_DIR, export_public, load_native_lazy

    tokenizer = tokenizer or (checkpoint / TOKENIZER_DIR if (checkpoint / TOKENIZER_DIR).is_dir() else None)
    assets = assets or (checkpoint / ASSETS_DIR if (checkpoint / ASSETS_DIR).is_dir() else None)
    try:
        cfg, sd = load_native_lazy(checkpoint)  # streamed tensor by tensor
        export_public(
            sd,
            cfg,
            out,
            tokenizer_dir=tokenizer,
            assets_dir=assets,
            dtype=dtype,
            max_shard_bytes=int(max_shard_gb * 2**30),
        )
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    console.print(f"exported {checkpoint} -> {out}" + (f" (tokenizer from {tokenizer})" if tokenizer else ""))


def smoke_cmd(
    preset_name: str = typer.Option("tiny", "--preset"),
    steps: int = typer.Option(40, "--steps", min=1),
    seed: int = typer.Option(0, "--seed"),
    out: Path | None = typer.Option(None, "--out", help="write summary.json + checkpoint here"),
) -> None:
    """Train the model on generated multimodal batches with Muon and show the loss falling."""
    from tasks.train.smoke import SmokeConfig, run_smoke

    cfg = _preset(preset_name)
    if cfg.name == "a3b":
        fail("--preset a3b: the smoke run is for tiny/small on a CPU")
    summary = run_smoke(SmokeConfig(preset=preset_name, steps=steps, seed=seed), out_dir=out, log=log)
    sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
