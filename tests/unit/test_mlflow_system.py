"""MLflow system metrics on a phase run (``tasks/tracking/mlflow_system.py``): the CPU share from the
monitor's own baseline (whatever thread ends the phase), the samples since the last publish flushed when
it stops, and no monitor without a run."""

from __future__ import annotations

import threading
import time
from collections import namedtuple

from tasks.tracking.mlflow_system import busy_percent, system_metrics

Times = namedtuple("Times", "user nice system idle iowait guest guest_nice")


def test_busy_percent():
    a = Times(10, 0, 5, 80, 5, 0, 0)
    assert busy_percent(a, Times(40, 0, 15, 120, 5, 0, 0)) == 50.0  # 40 busy of 80
    assert busy_percent(a, Times(10, 0, 5, 100, 5, 0, 0)) == 0.0
    assert busy_percent(a, a) is None  # no time passed: no figure
    # guest time is inside user already: counted once
    assert busy_percent(a, Times(30, 0, 5, 100, 5, 20, 0)) == 50.0


def test_phase_ended_by_another_thread_gets_its_cpu_share(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("sys"))
    run_id = run.info.run_id

    def phase() -> None:  # a busy phase shorter than the 10 s sampling interval
        with system_metrics(run_id, uri) as monitor:
            assert monitor is not None
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                sum(i * i for i in range(20_000))

    t = threading.Thread(target=phase)
    t.start()
    t.join()
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    mem = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) == 1 and 0 < cpu[0].value <= 100, cpu
    assert len(mem) == 1 and mem[0].value > 0


def test_no_run_no_monitor():
    with system_metrics(None, "sqlite:///unused.db") as monitor:
        assert monitor is None


def test_a_monitor_that_cannot_start_never_stops_the_phase():
    logs: list[str] = []
    with system_metrics("0" * 32, "bogus-scheme://nowhere", log=logs.append) as monitor:
        pass
    assert monitor is None and logs and logs[0].startswith("[tracking] system metrics off:")
