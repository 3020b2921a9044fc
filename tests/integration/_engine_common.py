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
            # 1e-5 is ~300x below one update at the tests' LR (3e-3). Adam(W) divides each element's
            # gradient by its own running RMS, which amplifies fp32 summation-order noise (micro-batch
            # accumulation vs one backward; the fused head's chunked sums) in elements with small, fresh
            # gradients: measured 1.8e-6 after 3 steps, in an embedding row first seen at step 2 or 3.
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
