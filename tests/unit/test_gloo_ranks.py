"""The gloo rank runner the multi-rank unit tests share (``tests/gloo_ranks.py``) fails when it should."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.gloo_ranks import run_ranks


def _sum_body(rank: int, out_dir: Path) -> None:
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    (out_dir / f"sum{rank}.txt").write_text(str(float(t)))


def _raise_body(rank: int, out_dir: Path) -> None:
    if rank == 1:
        raise ValueError("rank one is broken")


def _abort_body(rank: int, out_dir: Path) -> None:
    if rank == 1:
        os.abort()  # dies by SIGABRT before finishing; rank 0 then waits at the barrier until killed


@pytest.mark.timeout(360)
def test_ranks_talk_and_finish(tmp_path):
    run_ranks(_sum_body, tmp_path)
    assert [(tmp_path / f"sum{r}.txt").read_text() for r in (0, 1)] == ["3.0", "3.0"]


@pytest.mark.timeout(360)
def test_a_raising_rank_fails_with_its_traceback(tmp_path):
    with pytest.raises(AssertionError, match="rank 1: raised:(.|\n)*rank one is broken"):
        run_ranks(_raise_body, tmp_path)


@pytest.mark.timeout(360)
def test_a_rank_dying_before_it_finishes_fails(tmp_path):
    with pytest.raises(AssertionError) as err:
        run_ranks(_abort_body, tmp_path, timeout=60)
    assert "died before finishing" in str(err.value) or "still running" in str(err.value), err.value
