"""The sharded checkpoint format's files (``tasks/train/sharded_checkpoint.py``): DCP's pickled
``.metadata`` is read with an unpickler that runs no code, and only tensors are accepted."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tasks.io.weights import CheckpointError
from tasks.train.sharded_checkpoint import SafeReader, read_metadata, read_model_tensors, slice_key


def _save(tmp_path, state) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving in a single process"
        dcp.save(state, checkpoint_id=str(tmp_path))


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_metadata_is_read_without_running_code(tmp_path):
    state = {"model.w": torch.randn(3, 4), "model.b": torch.zeros(4, dtype=torch.bfloat16)}
    _save(tmp_path, state)
    md = read_metadata(tmp_path)
    assert set(md.state_dict_metadata) == set(state)
    assert torch.equal(read_model_tensors(tmp_path)["w"], state["model.w"])
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match=r"refused global posix\.system|refused global os\.system"):
        read_metadata(tmp_path)
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointError, match="not DCP metadata"):
        SafeReader(str(tmp_path)).read_metadata()


def test_only_tensors_are_accepted(tmp_path):
    _save(tmp_path, {"model.w": torch.ones(2), "extra": {"a": 1}})  # a non-tensor is pickled by DCP
    with pytest.raises(CheckpointError, match="pickled objects"):
        read_metadata(tmp_path)


def test_expert_slices_are_concatenated(tmp_path):
    full = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3, 2)
    _save(tmp_path, {slice_key("model.e", j, 2): full[2 * j : 2 * j + 2].clone() for j in range(2)})
    assert torch.equal(read_model_tensors(tmp_path)["e"], full)
