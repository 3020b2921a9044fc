"""Prefect's console log handlers follow ``sys.stderr`` (``flows.prefect_common.CURRENT_STDERR``).

Prefect creates them once, on import, bound to the ``sys.stderr`` object of that moment. Imported while a
caller had swapped it (typer's ``CliRunner`` running ``kimivl run``, a notebook cell, pytest's capture),
they used to keep writing to that stream after it was closed: every later Prefect log line was a logging
error, and inside a flow with ``log_prints`` the error report recursed (seen as a RecursionError in a
Prefect test that ran after a CLI test)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import io, logging, sys
real, swapped = sys.stderr, io.StringIO()
sys.stderr = swapped
import flows.prefect_common  # Prefect's handlers are created now, while sys.stderr is swapped
logging.getLogger("prefect.kimivl_test").warning("while-swapped")
sys.stderr = real
swapped.close()
logging.getLogger("prefect.kimivl_test").warning("after-close")
"""


def test_prefect_console_logs_follow_the_current_stderr():
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "after-close" in p.stderr and "while-swapped" not in p.stderr, p.stderr[-3000:]
    assert "Logging error" not in p.stderr and "closed file" not in p.stderr, p.stderr[-3000:]
