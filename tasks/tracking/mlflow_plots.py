"""The run's plots for MLflow: the loss across every phase against cumulative training tokens (phase
boundaries dashed) and the tokens of each phase by modality."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_and_tokens(pt: Any) -> list[Path]:
    """The loss across phases (x: cumulative tokens) and the tokens per phase by modality, as PNGs in
    ``LOCAL_DIR/plots`` of a ``PipelineTracking`` ``pt``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = pt.local_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    all_series = {p.name: pt.phase_series(p.name) for p in pt.recipe.phases}
    order = [n for n, s in all_series.items() if s is not None]
    fig = Figure(figsize=(10, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    offset, bars = 0.0, {}
    for name in order:
        s = all_series[name]
        steps = sorted(set(s["loss"]) & set(s["tokens_total"]))
        xs = [offset + s["tokens_total"][i] for i in steps]
        if xs:
            ax.plot(xs, [s["loss"][i] for i in steps], lw=1.2, label=name)
        if offset > 0:
            ax.axvline(offset, color="grey", ls="--", lw=0.8)
        ax.text(
            offset,
            0.99,
            f" {name}",
            rotation=90,
            va="top",
            fontsize=7,
            transform=ax.get_xaxis_transform(),
        )
        res_tok = pt.results.get(name, {}).get("tokens", {})
        total = float(res_tok.get("total", max(s["tokens_total"].values(), default=0.0)))
        offset += total
        bars[name] = {
            m: float(res_tok.get(m, max(s[f"tokens_{m}"].values(), default=0.0)))
            for m in ("text", "image", "video")
        }
    ax.set_xlim(left=0, right=max(offset, 1.0))
    ax.set_xlabel("cumulative training tokens")
    ax.set_ylabel("loss")
    ax.set_title(f"{pt.recipe.name}: loss across phases (dashed: phase boundaries)")
    if any(not str(line.get_label()).startswith("_") for line in ax.lines):
        ax.legend(fontsize=7, ncol=2)
    loss_png = out / "loss_curve.png"
    fig.savefig(loss_png, dpi=100, bbox_inches="tight")

    fig2 = Figure(figsize=(10, 4.5))
    FigureCanvasAgg(fig2)
    ax2 = fig2.add_subplot()
    bottom = [0.0] * len(order)
    for m in ("text", "image", "video"):
        vals = [bars[n][m] for n in order]
        ax2.bar(order, vals, bottom=bottom, label=m)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set_ylabel("tokens")
    ax2.set_title(f"{pt.recipe.name}: tokens per phase by modality")
    ax2.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax2.legend()
    bar_png = out / "tokens_by_phase.png"
    fig2.savefig(bar_png, dpi=100, bbox_inches="tight")
    return [loss_png, bar_png]
