"""``SafetensorsWriter``: a safetensors file written tensor by tensor (the streamed phase-end export)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from tasks.io.weights import SafetensorsWriter, load_safetensors


def test_streamed_file_is_a_valid_safetensors_file(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5),
        "a.bias": torch.randn(7).to(torch.bfloat16),
        "count": torch.tensor([1, 2, 3], dtype=torch.int64),
        "flag": torch.tensor([True, False]),
    }
    path = tmp_path / "w.safetensors"
    w = SafetensorsWriter(
        path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], {"step": "3", "a": "1"}
    )
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    got = load_safetensors(path)
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"a": "1", "step": "3"}
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # the data starts 8-byte aligned


def test_wrong_order_or_missing_tensors_leave_no_file(tmp_path):
    path = tmp_path / "w.safetensors"
    w = SafetensorsWriter(path, [("x", (2,), torch.float32), ("y", (2,), torch.float32)])
    with pytest.raises(ValueError, match="expected"):
        w.write("y", torch.zeros(2))
    w.abort()
    assert list(tmp_path.iterdir()) == []
    w = SafetensorsWriter(path, [("x", (2,), torch.float32), ("y", (2,), torch.float32)])
    w.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="1 tensors never written"):
        w.close()
    assert list(tmp_path.iterdir()) == []
