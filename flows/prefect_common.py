"""What every Prefect flow of this project shares: environment defaults, the I/O retry policy, logging,
and the tokens-table artifact.

Import this module before ``prefect`` itself: Prefect reads its settings from the environment once, at
import time, so the defaults below only take effect when set first (explicit environment values win).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from flows.local_api import ENV_DEFAULTS as _ENV_DEFAULTS  # imports no Prefect
from tasks import Log
from tasks.train.stages import token_mix

for _k, _v in _ENV_DEFAULTS.items():
    os.environ.setdefault(_k, _v)

from prefect import get_run_logger  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.exceptions import MissingContextError  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

# Errors that a retry cannot fix: a missing input, a bad config, a corrupt manifest (all ValueErrors here).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ValueError,
    TypeError,
    KeyError,
    NotImplementedError,
)


def retry_on_transient_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O hiccups (network, S3, a full disk freed later), not
    deterministic failures, which would only fail again after the backoff."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    return not isinstance(exc, PERMANENT_ERRORS)


def io_task_options(retries: int = 3) -> dict[str, Any]:
    """Task options for I/O-bound steps: exponential backoff (2, 4, 8, ... s, with jitter)."""
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=2),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_on_transient_error,
        "cache_policy": NO_CACHE,
    }


def start_local_server() -> str | None:
    """Start Prefect's local (ephemeral) API server now, as the first flow run would, and return its URL;
    None when ``PREFECT_API_URL`` names a server (nothing to start).

    Starting it is mostly waiting for a ``uvicorn`` subprocess to come up (~5 s on 2 cores), so a caller
    can overlap other start-up work with it (``flows.pipeline.run_pipeline``). Prefect keeps one server
    per process: the flow run that follows finds it running and uses it.
    """
    from prefect.settings import PREFECT_API_URL

    from flows.local_api import wait_ready

    if wait_ready() is not None or PREFECT_API_URL.value():  # started early (flows.local_api), or a server
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def run_log() -> Log:
    """The current flow/task run's logger (shows in the UI and the terminal); ``print`` outside a run."""
    try:
        return get_run_logger().info
    except MissingContextError:
        return print


class _CurrentStderr:
    """A text stream that writes wherever ``sys.stderr`` points at the moment of the write."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        with contextlib.suppress(ValueError):  # a caller's swapped-in stream, already closed
            sys.stderr.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the current stream
        return getattr(sys.stderr, name)


CURRENT_STDERR: TextIO = _CurrentStderr()  # type: ignore[assignment]


def _bind_console_handlers(stream: TextIO) -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, PrefectConsoleHandler):
                with h.lock or contextlib.nullcontext():
                    h.stream = stream  # not setStream(): it flushes the old stream, which may be closed
                    h.console.file = stream


# Prefect builds its console log handlers once, on its import, bound to the ``sys.stderr`` object of that
# moment. A caller that swaps ``sys.stderr`` (typer's ``CliRunner``, notebooks, pytest's capture) and
# closes it afterwards would leave them writing to a closed stream; with ``log_prints`` the resulting error
# report recurses. Bound to ``CURRENT_STDERR`` they always write to the stream current at the time.
_bind_console_handlers(CURRENT_STDERR)


@contextlib.contextmanager
def console_logs_to_current_stderr() -> Iterator[None]:
    """Prefect's console log handlers write to the current ``sys.stderr`` (also handlers that a later
    logging setup created)."""
    _bind_console_handlers(CURRENT_STDERR)
    yield


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")


def _loss(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def mlflow_cell(result: dict[str, Any]) -> str:
    run_id, url = result.get("mlflow_run_id"), result.get("mlflow_url")
    if url:
        return f"[{run_id or 'run'}]({url})"
    return str(run_id) if run_id else "-"


def tokens_table(results: Iterable[dict[str, Any]]) -> str:
    """Markdown: tokens per phase (text/image/video/total), token mix by group, steps, final loss,
    checkpoint, MLflow run."""
    head = (
        "| phase | stage | text | image | video | total | mix (tokens) | steps | final loss | checkpoint "
        "| MLflow run |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    total = {"text": 0, "image": 0, "video": 0, "total": 0}
    steps = 0
    for r in results:
        tok = r.get("tokens", {})
        for k in total:
            total[k] += int(tok.get(k, 0))
        steps += int(r.get("steps", 0))
        lines.append(
            f"| {r['phase']} | {r.get('stage', '-')} | {tok.get('text', 0):,} | {tok.get('image', 0):,} | "
            f"{tok.get('video', 0):,} | {tok.get('total', 0):,} | {token_mix(r.get('tokens_by_group'))} | {r.get('steps', 0)} | "
            f"{_loss(r.get('final_loss'))} | `{r.get('checkpoint', '-')}` | {mlflow_cell(r)} |"
        )
    lines.append(
        f"| **all** | | {total['text']:,} | {total['image']:,} | {total['video']:,} | {total['total']:,} | | "
        f"{steps} | | | |"
    )
    return "\n".join(lines) + "\n"
