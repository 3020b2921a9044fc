"""Shared by ``test_engine.py`` and ``test_engine_checkpoints.py``: the one-thread fixture, a state check.

The tiny model, the deterministic batches and the loss live in ``_engine_worker.py`` (the subprocess runs
import it as a script, so it stays free of pytest); this module holds what only the in-process tests need.
Each test module imports ``_one_thread_and_clean_process_group`` so the autouse fixture applies to it.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_clean_process_group():
    """One torch thread (robust on 2 shared cores, bit-comparable with the workers). The single-rank
    process group the engines opened stays up for the rest of the session (DeepSpeed caches groups, so a
    destroyed and re-created group breaks later in-process engines)."""
    threads, env = torch.get_num_threads(), dict(os.environ)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(env)


def _assert_equal_state(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
