"""A batch that MLflow refuses for good is split until only the refused records are left: they go to
``rejected.jsonl``, every other record of the batch is delivered (``MlflowTracker._try_split``).

Real MLflow SQLite store; the refusal is injected (after name cleaning, nothing this project logs is
refused by MLflow any more), as MLflow itself raises it: ``MlflowException(INVALID_PARAMETER_VALUE)``.
"""

from __future__ import annotations

import json

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from tasks.tracking.mlflow_pipeline import PipelineTracking
from tests.integration.conftest import short_recipe


def test_only_the_refused_records_of_a_batch_are_rejected(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pt = PipelineTracking(
        uri, experiment="split", local_dir=tmp_path / "trk", flush_interval_s=3600.0, log=print
    )
    pt.start_pipeline(short_recipe(), "split")
    tr = pt.phase_tracker("text_pretrain")
    client = pt.conn._client
    real_log_batch, calls = client.log_batch, []

    def log_batch(
        run_id, metrics=(), params=(), tags=(), **kw
    ):  # refuses any batch holding a "poison" record
        calls.append(len(metrics) + len(params) + len(tags))
        if any("poison" in x.key for x in [*metrics, *params, *tags]):
            raise MlflowException("refused by the test", error_code=INVALID_PARAMETER_VALUE)
        return real_log_batch(run_id, metrics=metrics, params=params, tags=tags, **kw)

    client.log_batch = log_batch
    for step in range(1, 51):  # 50 steps x 4 values, buffered (no flush before the end): one 200-metric batch
        vals = {"loss": 1.0 / step, "lr": 0.1, "grad_norm": float(step)}
        vals["poison" if step == 17 else "tokens_total"] = float(step)
        tr.log_metrics(vals, step=step)
    tr.log_params({f"p{i}": i for i in range(30)} | {"poison_param": 1})
    report = pt.end_pipeline()
    client.log_batch = real_log_batch

    assert report["rejected"] == 2 and report["undelivered"] == 0
    data = MlflowClient(uri).get_run(tr.run_id).data
    assert "poison" not in data.metrics and "poison_param" not in data.params
    assert len(data.params) >= 30 and all(data.params[f"p{i}"] == str(i) for i in range(30))
    history = MlflowClient(uri).get_metric_history(tr.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 51))  # nothing else of the poisoned batch was lost
    assert len(MlflowClient(uri).get_metric_history(tr.run_id, "tokens_total")) == 49
    rejected = [json.loads(x) for x in (tr.spool_dir / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["what"] for r in rejected) == ["metrics", "params"]
    by_what = {r["what"]: r["payload"] for r in rejected}
    assert by_what["metrics"] == [[17, by_what["metrics"][0][1], {"poison": 17.0}]]
    assert by_what["params"] == {"poison_param": "1"}
    # bisection, not one request per record: ~2 log2(200) extra requests for one bad metric
    assert len(calls) < 40
