"""Threads per process: ranks and data workers on one host share its cores."""

from __future__ import annotations

import torch

from tasks.train.threads import configure_rank, rank_threads, single_threaded


def test_a_rank_gets_its_share_of_the_cores_less_one_per_worker():
    assert rank_threads(0, {}, cpus=2) == 2
    assert rank_threads(1, {}, cpus=2) == 1
    assert rank_threads(2, {}, cpus=2) == 1  # never below 1
    assert rank_threads(0, {"LOCAL_WORLD_SIZE": "2"}, cpus=2) == 1  # torchrun
    assert rank_threads(3, {"LOCAL_WORLD_SIZE": "8"}, cpus=64) == 5
    assert rank_threads(0, {"LOCAL_SIZE": "4"}, cpus=16) == 4  # the deepspeed launcher's variable
    assert rank_threads(2, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "8"}, cpus=2) == 3  # the operator's


def test_configure_rank_and_single_threaded_set_torch_and_lance(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("LANCE_CPU_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        assert configure_rank(0) == 1 and torch.get_num_threads() == 1
        import os

        assert os.environ["LANCE_CPU_THREADS"] == "1"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setenv("MKL_NUM_THREADS", "2")
        single_threaded()
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
