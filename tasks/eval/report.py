"""Presenting an evaluation: flat summary metrics, NIAH plots, the Markdown report, and report diffs.

The plots use matplotlib's object API (no pyplot, no global backend switch) when it is importable and fall
back to plain PIL drawings otherwise, so a report never depends on an optional plotting stack.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tasks.io.files import atomic_path

NIAH_KINDS = ("niah_text", "niah_video")
_COUNT_KEYS = ("n", "tokens", "batches")
HEATMAP, RECALL_PLOT = "niah_heatmap.png", "niah_recall.png"


def summary_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat ``task/metric`` numbers (tracker-safe names: letters, digits, ``_ . / -``)."""
    out: dict[str, float] = {}
    for task, res in result["tasks"].items():
        for k, v in res["metrics"].items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in _COUNT_KEYS:
                out[f"{task}/{k}"] = float(v)
        for label, v in (res.get("recall_by_bin") or {}).items():
            if v is not None:
                out[f"{task}/recall_le_{_upper(label)}"] = float(v)
    if result.get("heldout_overlap") is not None:
        out["heldout/overlap"] = float(result["heldout_overlap"])
    return out


def _upper(label: str) -> int:
    return int(label.strip("(]").split(",")[1])


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def _cell(text: Any, limit: int = 80) -> str:
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def render_report(result: dict[str, Any]) -> str:
    """Markdown: run facts, a table per task, held-out set statistics, NIAH tables and plots, failures."""
    lines = ["# Evaluation report", ""]
    lines += [
        f"- checkpoint: `{result['checkpoint']}` (model `{result['model']}`, RoPE theta {result['rope_theta']:g})",
        f"- prompt style: {result['config']['prompt_style']}, device: {result['device']}, "
        f"time: {result.get('seconds', 0.0):.1f} s",
        f"- held-out overlap with the training data: {_fmt(result['heldout_overlap'])}"
        + ("" if result["heldout_overlap"] is not None else " (not checked: no training data root given)"),
        "",
        "## Tasks",
        "",
    ]
    rows = []
    for task, res in result["tasks"].items():
        for k, v in res["metrics"].items():
            if k != "n":
                rows.append([task, k, v, res["metrics"].get("n"), f"{res['seconds']:.1f}"])
    lines += [*_table(["task", "metric", "value", "n", "seconds"], rows), ""]
    if result["heldout"]:
        lines += ["## Held-out sets", ""]
        rows = [
            [t, h["seed"], h["items"], h["candidates"], h["rejected_overlap"], h["overlap"]]
            for t, h in result["heldout"].items()
        ]
        lines += [*_table(["task", "seed", "items", "candidates", "rejected (overlap)", "overlap"], rows), ""]
    niah = {k: result["tasks"][k] for k in NIAH_KINDS if k in result["tasks"]}
    if niah:
        lines += ["## Needle in a haystack: recall per length bin (tokens)", ""]
        bins = sorted({b for r in niah.values() for b in r["recall_by_bin"]}, key=_upper)
        rows = [[b, *(r["recall_by_bin"].get(b) for r in niah.values())] for b in bins]
        lines += [*_table(["bin", *niah], rows), ""]
        for kind, r in niah.items():
            g = r["grid"]
            lines += [f"### {kind}: depth x length", ""]
            rows = [[f"{d:.0%}", *vals] for d, vals in zip(g["depths"], g["recall"], strict=True)]
            lines += [*_table(["depth \\ length", *map(str, g["lengths"])], rows), ""]
        for p in result.get("plots", []):
            lines += [f"![{Path(p).stem}]({p})", ""]
    fails = [(t, f) for t, r in result["tasks"].items() for f in r.get("failures", [])[:3]]
    if fails:
        lines += ["## Failures (first 3 per task)", ""]
        rows = [
            [t, f["id"], _cell(f["prompt"]), _cell(f["answer"], 40), _cell(f["prediction"], 60)]
            for t, f in fails
        ]
        lines += [*_table(["task", "id", "prompt", "answer", "prediction"], rows), ""]
    return "\n".join(lines)


def compare_reports(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Markdown diff of two eval results (e.g. NIAH after cooldown vs after long context): every summary
    metric side by side with B - A, and NIAH recall per bin."""
    na, nb = names
    sa, sb = a.get("summary") or summary_metrics(a), b.get("summary") or summary_metrics(b)
    lines = [
        f"# Evaluation comparison: {na} vs {nb}",
        "",
        f"- {na}: `{a['checkpoint']}`",
        f"- {nb}: `{b['checkpoint']}`",
        "",
    ]
    keys = sorted(k for k in set(sa) | set(sb) if "/recall_le_" not in k)
    rows = [[k, sa.get(k), sb.get(k), _delta(sa.get(k), sb.get(k))] for k in keys]
    lines += [*_table(["metric", na, nb, f"{nb} - {na}"], rows), ""]
    kinds = [k for k in NIAH_KINDS if k in a["tasks"] or k in b["tasks"]]
    if kinds:
        lines += ["## NIAH recall per length bin", ""]
        rows = []
        for kind in kinds:
            ra = a["tasks"].get(kind, {}).get("recall_by_bin", {})
            rb = b["tasks"].get(kind, {}).get("recall_by_bin", {})
            for bin_ in sorted(set(ra) | set(rb), key=_upper):
                rows.append([kind, bin_, ra.get(bin_), rb.get(bin_), _delta(ra.get(bin_), rb.get(bin_))])
        lines += [*_table(["task", "bin", na, nb, f"{nb} - {na}"], rows), ""]
    return "\n".join(lines)


def _delta(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else y - x


# ------------------------------------------------------------------------------------------------ plots


def write_plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the NIAH heatmap and recall-per-bin plot (when a NIAH task ran); returns the file names."""
    niah = {k: result["tasks"][k] for k in NIAH_KINDS if k in result["tasks"]}
    if not niah:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib comes with MLflow here
        _pil_plots(niah, out_dir)
        return [HEATMAP, RECALL_PLOT]

    fig = Figure(figsize=(4.5 * len(niah), 3.6))
    FigureCanvasAgg(fig)
    for i, (kind, r) in enumerate(niah.items()):
        ax = fig.add_subplot(1, len(niah), i + 1)
        g = r["grid"]
        vals = [[math.nan if v is None else v for v in row] for row in g["recall"]]
        im = ax.imshow(vals, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(g["lengths"])), [str(x) for x in g["lengths"]])
        ax.set_yticks(range(len(g["depths"])), [f"{d:.0%}" for d in g["depths"]])
        ax.set_xlabel("haystack length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{kind} recall")
        for y, row in enumerate(vals):
            for x, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, out_dir / HEATMAP)

    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for kind, r in niah.items():
        bins = list(r["recall_by_bin"])
        ax.plot(range(len(bins)), [r["recall_by_bin"][b] for b in bins], marker="o", label=kind)
        ax.set_xticks(range(len(bins)), bins, rotation=20, fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("recall")
    ax.set_xlabel("haystack length bin (tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out_dir / RECALL_PLOT)
    return [HEATMAP, RECALL_PLOT]


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def _color(v: float | None) -> tuple[int, int, int]:
    if v is None:
        return (200, 200, 200)
    return (int(220 * (1 - v)), int(180 * v) + 40, 60)


def _pil_plots(niah: dict[str, Any], out_dir: Path) -> None:
    from PIL import Image, ImageDraw

    cell = 48
    width = sum((len(r["grid"]["lengths"]) + 1) * cell + 16 for r in niah.values())
    height = max(len(r["grid"]["depths"]) + 2 for r in niah.values()) * cell
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    x0 = 0
    for kind, r in niah.items():
        g = r["grid"]
        d.text((x0 + 4, 4), kind, fill="black")
        for j, L in enumerate(g["lengths"]):
            d.text((x0 + (j + 1) * cell + 4, cell // 2), str(L), fill="black")
        for i, (dep, row) in enumerate(zip(g["depths"], g["recall"], strict=True)):
            y = (i + 1) * cell
            d.text((x0 + 4, y + cell // 3), f"{dep:.0%}", fill="black")
            for j, v in enumerate(row):
                x = x0 + (j + 1) * cell
                d.rectangle([x, y, x + cell - 2, y + cell - 2], fill=_color(v))
                d.text((x + 6, y + cell // 3), _fmt(v)[:4], fill="black")
        x0 += (len(g["lengths"]) + 1) * cell + 16
    with atomic_path(out_dir / HEATMAP) as tmp:
        img.save(tmp, format="PNG")
    bins = max(len(r["recall_by_bin"]) for r in niah.values())
    img = Image.new("RGB", (bins * 60 * len(niah) + 40, 220), "white")
    d = ImageDraw.Draw(img)
    for k, r in enumerate(niah.values()):
        for j, v in enumerate(r["recall_by_bin"].values()):
            x = 20 + (j * len(niah) + k) * 60
            d.rectangle([x, 200 - int(180 * (v or 0)), x + 50, 200], fill=_color(v))
    with atomic_path(out_dir / RECALL_PLOT) as tmp:
        img.save(tmp, format="PNG")
