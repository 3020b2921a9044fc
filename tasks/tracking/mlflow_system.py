"""System metrics of a phase run: MLflow's own ``SystemMetricsMonitor`` (CPU and memory of the host,
disk, network, and GPU utilisation/memory/power when ``pynvml`` sees NVIDIA GPUs), logged as ``system/...``
on the phase's nested run, so a user sees in the MLflow UI where the phase's time went.

Two changes to MLflow's monitor, both measured on a served tiny phase (2.4 s, 10 s interval):
- when it stops it publishes the samples taken since its last publish (MLflow's loop drops them), after
  one last sample, so a phase shorter than the sampling interval gets one averaged point instead of none;
- CPU utilisation is the busy share of the CPU time between two samples of this monitor (its own
  baseline). MLflow's monitor asks ``psutil.cpu_percent()``, whose baseline is kept per calling thread:
  the last sample, taken by the thread that ends the phase, read 0 % for a phase that kept both cores busy.
The interval is ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (MLflow's variable), else 10 s.

What it measures is the host of the flow process (psutil is system-wide there, so ranks launched on the
same node are included); launched ranks on other nodes are not measured.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from tasks import Log

DEFAULT_INTERVAL_S = 10.0


def busy_percent(before: Any, after: Any) -> float | None:
    """Busy share (%) of the CPU time between two ``psutil.cpu_times()``; None when no time passed."""

    def delta(k: str) -> float:
        return getattr(after, k, 0.0) - getattr(before, k, 0.0)

    # Linux counts guest time inside user/nice as well: not twice
    total = sum(after) - sum(before) - delta("guest") - delta("guest_nice")
    if total <= 0:
        return None
    busy = total - delta("idle") - delta("iowait")
    return round(100.0 * min(max(busy / total, 0.0), 1.0), 1)


def _monitor_class() -> Any:
    import psutil
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class CpuShare(CPUMonitor):
        """MLflow's CPU monitor (memory as it is) with the CPU share measured from its own baseline."""

        def __init__(self) -> None:
            super().__init__()
            self._last = psutil.cpu_times()

        def collect_metrics(self) -> None:
            super().collect_metrics()
            now = psutil.cpu_times()
            share, self._last = busy_percent(self._last, now), now
            samples = self._metrics["cpu_utilization_percentage"]
            if share is None:
                samples.pop()  # no time since the last sample: no figure, rather than a false 0
                if not samples:
                    del self._metrics["cpu_utilization_percentage"]
            else:
                samples[-1] = share

    class PhaseSystemMetrics(SystemMetricsMonitor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.monitors = [CpuShare() if isinstance(m, CPUMonitor) else m for m in self.monitors]

        def finish(self) -> None:
            if self._process is None:
                return
            self._shutdown_event.set()
            self._process.join()
            self._process = None
            self.collect_metrics()  # psutil's CPU share since the previous sample: the tail of the phase
            metrics = self.aggregate_metrics()
            if metrics:
                self.publish_metrics(metrics)
            self.mlflow_logger.flush()

    return PhaseSystemMetrics


@contextlib.contextmanager
def system_metrics(
    run_id: str | None, tracking_uri: str, *, resume: bool = False, log: Log = print
) -> Iterator[Any]:
    """MLflow system metrics on ``run_id`` while the block runs (nothing without a run id). Trouble
    starting or stopping the monitor is logged, never raised: it must not stop training."""
    if not run_id:
        yield None
        return
    monitor = None
    try:
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no INFO lines per phase
        monitor = _monitor_class()(
            run_id, sampling_interval=DEFAULT_INTERVAL_S, resume_logging=resume, tracking_uri=tracking_uri
        )
        monitor.start()
    except Exception as e:  # a monitor that cannot start costs the run nothing but its system metrics
        log(f"[tracking] system metrics off: {type(e).__name__}: {e}")
        monitor = None
    try:
        yield monitor
    finally:
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as e:
                log(f"[tracking] system metrics not flushed: {type(e).__name__}: {e}")
