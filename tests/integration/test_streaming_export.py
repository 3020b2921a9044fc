"""The public-layout export streams (``save_hf`` over a ``SafetensorsFile``): the same files, byte for byte,
as an export from the whole state dict in memory, and a process exporting the small preset (~0.4 GB of fp32
weights) never holds the whole model: its peak RSS grows by less than half the weights' size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kimivl_model.config import preset
from kimivl_model.vlm import KimiVL
from tasks.io.files import sha256_file
from tasks.io.weights import (
    NATIVE_WEIGHTS,
    SafetensorsFile,
    export_public,
    load_native,
    load_native_lazy,
    save_native,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _native(tmp_path: Path, name: str) -> Path:
    torch.manual_seed(0)
    cfg = preset(name)
    return save_native(KimiVL(cfg).state_dict(), cfg, tmp_path / f"native-{name}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_export_is_byte_identical_to_the_in_memory_one(tmp_path, dtype):
    src = _native(tmp_path, "tiny")
    cfg, whole = load_native(src)
    lazy_cfg, lazy = load_native_lazy(src)
    assert isinstance(lazy, SafetensorsFile) and lazy_cfg == cfg and set(lazy) == set(whole)
    a = export_public(whole, cfg, tmp_path / "eager", dtype=dtype, max_shard_bytes=2**20)
    b = export_public(lazy, cfg, tmp_path / "streamed", dtype=dtype, max_shard_bytes=2**20)
    files = sorted(p.name for p in a.iterdir())
    assert (
        files == sorted(p.name for p in b.iterdir())
        and len([f for f in files if f.endswith(".safetensors")]) >= 3
    )
    for name in files:
        assert sha256_file(a / name) == sha256_file(b / name), name


_PEAK = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    import psutil
    from tasks.io.weights import export_public, load_native, load_native_lazy
    src, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    load = load_native_lazy if mode == "streamed" else load_native
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak, done = [before], threading.Event()
    def sample():  # the resident set every 5 ms while the export runs
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)
    t = threading.Thread(target=sample)
    t.start()
    cfg, sd = load(src)
    export_public(sd, cfg, out, dtype="float32", max_shard_bytes=32 * 2**20)
    done.set()
    t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(json.dumps({"grew": peak[0] - before}))
    """
)


@pytest.mark.timeout(600)
def test_streamed_export_never_holds_the_whole_model(tmp_path):
    src = _native(tmp_path, "small")
    weights = (src / NATIVE_WEIGHTS).stat().st_size
    grew = {}
    for mode in ("streamed", "eager"):
        done = subprocess.run(
            [sys.executable, "-c", _PEAK, str(src), str(tmp_path / mode), mode],
            capture_output=True, text=True, cwd=ROOT, timeout=500,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        grew[mode] = json.loads(done.stdout.strip().splitlines()[-1])["grew"]
    print({k: f"{v / 2**20:.0f} MiB" for k, v in grew.items()}, f"weights {weights / 2**20:.0f} MiB")
    assert grew["eager"] > 0.9 * weights  # the measurement sees a whole-model load (the old way)
    assert grew["streamed"] < 0.5 * weights
