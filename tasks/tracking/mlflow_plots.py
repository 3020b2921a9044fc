"""The run's plots for MLflow: the loss across every phase against cumulative training tokens (phase
boundaries dashed) and the tokens of each phase by modality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODALITIES = ("text", "image", "video")


def plot_loss_and_tokens(pt: Any) -> list[Path]:
    """The loss across phases (x: cumulative tokens) and the tokens per phase by modality, as PNGs in
    ``LOCAL_DIR/plots`` of a ``PipelineTracking`` ``pt``."""
    out = pt.local_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    all_series = {p.name: pt.phase_series(p.name) for p in pt.recipe.phases}
    series = {n: s for n, s in all_series.items() if s is not None}
    bars = {}
    for name, s in series.items():  # a finished phase's result counts, else the last logged step
        res_tok = pt.results.get(name, {}).get("tokens", {})
        bars[name] = {
            m: float(res_tok.get(m, max(s[f"tokens_{m}"].values(), default=0.0)))
            for m in (*MODALITIES, "total")
        }
    return [_loss_curve(pt.recipe.name, series, bars, out), _token_bars(pt.recipe.name, bars, out)]


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _loss_curve(name: str, series: dict[str, dict], bars: dict[str, dict], out: Path) -> Path:
    fig, ax = _figure()
    offset = 0.0
    for phase, s in series.items():
        steps = sorted(set(s["loss"]) & set(s["tokens_total"]))
        xs = [offset + s["tokens_total"][i] for i in steps]
        if xs:
            ax.plot(xs, [s["loss"][i] for i in steps], lw=1.2, label=phase)
        if offset > 0:
            ax.axvline(offset, color="grey", ls="--", lw=0.8)
        ax.text(
            offset, 0.99, f" {phase}", rotation=90, va="top", fontsize=7, transform=ax.get_xaxis_transform()
        )
        offset += bars[phase]["total"]
    ax.set_xlim(left=0, right=max(offset, 1.0))
    ax.set_xlabel("cumulative training tokens")
    ax.set_ylabel("loss")
    ax.set_title(f"{name}: loss across phases (dashed: phase boundaries)")
    if any(not str(line.get_label()).startswith("_") for line in ax.lines):
        ax.legend(fontsize=7, ncol=2)
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _token_bars(name: str, bars: dict[str, dict], out: Path) -> Path:
    fig, ax = _figure()
    order = list(bars)
    bottom = [0.0] * len(order)
    for m in MODALITIES:
        vals = [bars[n][m] for n in order]
        ax.bar(order, vals, bottom=bottom, label=m)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("tokens")
    ax.set_title(f"{name}: tokens per phase by modality")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend()
    path = out / "tokens_by_phase.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
