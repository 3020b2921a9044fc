"""After the fact: ``replay_spool`` delivers what a finished process left undelivered, ``compare_runs``
diffs two pipeline runs (params, final metrics per phase) for ``kimivl compare``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tasks import Log
from tasks.tracking.mlflow_connection import Connection
from tasks.tracking.mlflow_names import PHASE_TAG, is_remote
from tasks.tracking.mlflow_run import MlflowTracker, RunSpec

# --------------------------------------------------------------------------------------------- replay


def replay_spool(spool_root: Path | str, tracking_uri: str | None = None, log: Log = print) -> dict[str, int]:
    """Deliver the records a finished process left in ``spool_root`` (one pipeline's spool directory, as
    reported by ``end_pipeline``). Runs without an id yet are found by their tags or created.
    Returns ``{"delivered": n, "remaining": m}``."""
    root = Path(spool_root)
    metas = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/run.json"))}
    conns: dict[tuple[str, str], Connection] = {}
    trackers: dict[str, MlflowTracker] = {}

    def build(key: str) -> MlflowTracker:
        if key in trackers:
            return trackers[key]
        m = metas[key]
        uri = tracking_uri or m["tracking_uri"]
        loc = m.get("artifact_location")
        if loc is None and not is_remote(uri):  # as PipelineTracking would have chosen: LOCAL_DIR/mlartifacts
            loc = (root.parent.parent / "mlartifacts").resolve().as_uri()
        conn = conns.setdefault((uri, m["experiment"]), Connection(uri, m["experiment"], loc, log=log))
        parent = build(m["parent"]) if m.get("parent") else None
        spec = RunSpec(key, m["run_name"], dict(m["lookup"]), None if tracking_uri else m.get("run_id"))
        trackers[key] = MlflowTracker(conn, spec, root / key, parent=parent)
        return trackers[key]

    before = 0
    for key in metas:
        before += build(key).pending()
    for tr in trackers.values():
        tr.flush(force=True)
    remaining = sum(tr.pending() for tr in trackers.values())
    return {"delivered": before - remaining, "remaining": remaining}


# --------------------------------------------------------------------------------------------- compare


def _children(client: Any, run: Any) -> dict[str, Any]:
    kids = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
        max_results=1000,
    )
    return {
        k.data.tags.get(PHASE_TAG, k.info.run_name): k for k in sorted(kids, key=lambda r: r.info.start_time)
    }


def compare_runs(tracking_uri: str, run_a: str, run_b: str) -> dict[str, Any]:
    """Params that differ between two (pipeline) runs, and the final value of every metric per phase.

    Returns ``{"params": [(key, a, b)], "metrics": [(phase, key, a, b, a - b or None)]}``; a run without
    nested runs is compared as one phase named ``"(run)"``; parent-level metrics appear under
    ``"(pipeline)"`` only where they differ.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    ra, rb = client.get_run(run_a), client.get_run(run_b)
    pa, pb = ra.data.params, rb.data.params
    params = [(k, pa.get(k), pb.get(k)) for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)]
    ka, kb = _children(client, ra), _children(client, rb)
    if not ka and not kb:
        ka, kb = {"(run)": ra}, {"(run)": rb}
    order = list(ka) + [n for n in kb if n not in ka]
    rows: list[tuple[str, str, float | None, float | None, float | None]] = []

    def diff(x: float | None, y: float | None) -> float | None:
        return x - y if x is not None and y is not None and math.isfinite(x) and math.isfinite(y) else None

    for phase in order:
        ma = ka[phase].data.metrics if phase in ka else {}
        mb = kb[phase].data.metrics if phase in kb else {}
        for k in sorted(set(ma) | set(mb)):
            rows.append((phase, k, ma.get(k), mb.get(k), diff(ma.get(k), mb.get(k))))
    if "(run)" not in ka:
        ma, mb = ra.data.metrics, rb.data.metrics
        for k in sorted(set(ma) | set(mb)):
            if ma.get(k) != mb.get(k):
                rows.append(("(pipeline)", k, ma.get(k), mb.get(k), diff(ma.get(k), mb.get(k))))
    return {"params": params, "metrics": rows, "run_a": ra.info.run_name, "run_b": rb.info.run_name}
