"""Full disk and unwritable output directories: a clear error, and never a half-written or complete-looking
output.

Two ways to make a directory unwritable: ``chmod 0555`` (skipped when the tests run as root, who ignores
permission bits) and a path whose parent is a regular file (``NotADirectoryError``, which holds for root
too). A full disk is simulated by making the low-level write raise ``OSError(ENOSPC)`` after writing part
of the bytes. For each writer (dataset shards, manifests, native checkpoints, JSON results, the local
storage backend, the JSONL tracker) the target either keeps its previous complete content or does not
appear, no temp/staging file is left, and nothing is marked complete. Engine checkpoints: see
``tests/integration/test_reliability_checkpoints.py``.
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from kimivl_model.config import preset
from kimivl_model.vlm import KimiVL
from tasks.data import io as data_io
from tasks.data.filter import FilterConfig, run_filter
from tasks.io import storage
from tasks.io import weights as model_io
from tasks.io.files import write_json_atomic
from tasks.io.manifest import read_manifest, verify_files, write_manifest
from tasks.io.storage import StorageError
from tasks.io.weights import CheckpointIntegrityError, load_native, save_native
from tasks.tracking.local import JsonlTracker
from tests.unit.data.records import make_record, write_dataset

ROOT_USER = os.geteuid() == 0


def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def leftovers(d: Path) -> list[str]:
    """Temp and staging files anywhere under ``d``."""
    return sorted(str(p) for p in d.rglob("*") if ".tmp" in p.name or ".staging" in p.name)


@pytest.fixture
def dataset(tmp_path) -> Path:
    rows = [make_record(f"r{i}", "text", text=f"Plain words number {i} for the filter.") for i in range(7)]
    write_dataset(tmp_path / "in", rows, rows_per_shard=3)
    return tmp_path / "in"


@pytest.fixture(scope="module")
def tiny_weights():
    torch.manual_seed(0)
    return KimiVL(preset("tiny")).state_dict(), preset("tiny")


# ------------------------------------------------------------------------------------------- unwritable
@pytest.fixture(params=["chmod", "parent-is-a-file"])
def unwritable(request, tmp_path) -> Path:
    """A directory path nothing can be written under."""
    if request.param == "chmod":
        if ROOT_USER:
            pytest.skip(
                "running as root: permission bits do not stop root (the parent-is-a-file case covers it)"
            )
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        yield d / "out"
        d.chmod(0o755)
    else:
        (tmp_path / "blocker").write_text("a file, not a directory")
        yield tmp_path / "blocker" / "out"


def test_dataset_step_into_unwritable_dir(dataset, unwritable):
    with pytest.raises(OSError) as info:
        run_filter(dataset, unwritable, FilterConfig())
    assert str(unwritable.parent) in str(info.value)
    assert not unwritable.exists()


def test_native_checkpoint_and_json_into_unwritable_dir(tiny_weights, unwritable):
    sd, cfg = tiny_weights
    with pytest.raises(OSError) as info:
        save_native(sd, cfg, unwritable)
    assert str(unwritable.parent) in str(info.value)
    with pytest.raises(OSError):
        write_json_atomic({"a": 1}, unwritable / "summary.json")
    assert not unwritable.exists()


def test_local_storage_into_unwritable_dir(tmp_path, unwritable):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"x" * 100)
    with pytest.raises(StorageError, match=r"local put_file failed for .*out/a\.bin"):
        storage.put_file(tmp_path / "src" / "a.bin", str(unwritable / "a.bin"))
    with pytest.raises(StorageError, match="local put_dir failed"):
        storage.put_dir(tmp_path / "src", str(unwritable / "d"))
    assert not unwritable.exists()


def test_cli_data_step_into_unwritable_dir_exits_1(dataset, tmp_path):
    (tmp_path / "blocker").write_text("")
    out = tmp_path / "blocker" / "filtered"
    (tmp_path / "raw").mkdir()
    dataset.rename(tmp_path / "raw" / "in")
    args = ["data", "filter", "--in", str(tmp_path / "raw"), "--out", str(out)]
    res = CliRunner().invoke(_app(), args, env={"COLUMNS": "400"})
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "cannot write the output" in text and "Not a directory" in text, text
    assert "Traceback" not in text


def _app():
    from flows.cli import app

    return app


# ------------------------------------------------------------------------------------------- disk full
def test_disk_full_mid_dataset_keeps_the_previous_output(dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run_filter(dataset, out, FilterConfig(rows_per_shard=2))
    real = pq.write_table
    calls = []

    def full_on_second_shard(table, where, **kw):
        calls.append(where)
        if len(calls) < 2:
            return real(table, where, **kw)
        buf = io.BytesIO()
        real(table, buf, **kw)
        Path(where).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a torn shard
        raise enospc(where)

    monkeypatch.setattr(data_io.pq, "write_table", full_on_second_shard)
    with pytest.raises(OSError, match="No space left on device") as info:
        run_filter(
            dataset, out, FilterConfig(rows_per_shard=2, rules={"min_chars": 9})
        )  # a changed rule: reruns
    assert info.value.errno == errno.ENOSPC and "part-00001.parquet" in str(info.value)
    assert read_manifest(out) == first  # the previous complete output is untouched...
    verify_files(out)  # ...byte for byte
    assert leftovers(tmp_path) == []


def test_disk_full_while_writing_a_manifest_leaves_none(tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    (d / "part-00000.parquet").write_bytes(b"data")
    real_write_text = Path.write_text

    def torn(self, text, *a, **kw):  # half the manifest reaches the temp file, then the disk is full
        if self.name.startswith(".manifest.json."):
            real_write_text(self, text[: len(text) // 2])
            raise enospc(self)
        return real_write_text(self, text, *a, **kw)

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError, match="No space left"):
        write_manifest(d, kind="dataset", step="t", config={})
    assert sorted(p.name for p in d.iterdir()) == ["part-00000.parquet"]  # no manifest, no temp file


def _torn_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 64)  # some bytes made it before the disk filled up
    raise enospc(filename)


def test_disk_full_mid_native_checkpoint(tiny_weights, tmp_path, monkeypatch):
    sd, cfg = tiny_weights
    out = tmp_path / "ckpt"
    monkeypatch.setattr(model_io, "save_file", _torn_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_native(sd, cfg, out)
    assert sorted(p.name for p in out.iterdir()) == []  # no weights, no temp file, no manifest
    monkeypatch.undo()

    save_native(sd, cfg, out)  # a complete one; then a failed rewrite keeps it loadable and verified
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(model_io, "save_file", _torn_save_file)
    with pytest.raises(OSError):
        save_native({k: v + 1 for k, v in sd.items()}, cfg, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _, back = load_native(out)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_interrupted_native_rewrite_is_detected_not_loaded(tiny_weights, tmp_path, monkeypatch):
    """New weights landed, then the disk filled before the config/manifest: the old manifest no longer
    matches, so the load refuses instead of pairing new weights with stale metadata."""
    sd, cfg = tiny_weights
    out = tmp_path / "ckpt"
    save_native(sd, cfg, out)

    def full(obj, path):
        raise enospc(path)

    monkeypatch.setattr(model_io, "write_json_atomic", full)
    with pytest.raises(OSError):
        save_native({k: v * 2 for k, v in sd.items()}, cfg, out)
    monkeypatch.undo()
    with pytest.raises(
        CheckpointIntegrityError, match=r"model\.safetensors: content differs from its manifest"
    ):
        load_native(out)


def test_disk_full_mid_json_result_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_json_atomic({"version": 1}, target)
    real_write_text = Path.write_text

    def torn(self, data, *a, **kw):
        real_write_text(self, data[: len(data) // 2], *a, **kw)
        raise enospc(self)

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic({"version": 2, "big": "x" * 1000}, target)
    with pytest.raises(OSError):
        JsonlTracker(tmp_path / "track").log_params({"lr": 0.1})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"version": 1}
    assert not (tmp_path / "track" / "params.json").exists()
    assert leftovers(tmp_path) == []


def test_disk_full_in_local_storage_publishes_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("a.bin", "b.bin", "sub/c.bin"):
        (src / name).write_bytes(os.urandom(5000))
    storage.put_dir(src, str(tmp_path / "store" / "old"))
    real_copy = storage.shutil.copyfile
    n = {"calls": 0}

    def torn_copy(a, b, *args, **kw):
        n["calls"] += 1
        if n["calls"] == 2:
            Path(b).write_bytes(Path(a).read_bytes()[:100])
            raise enospc(b)
        return real_copy(a, b, *args, **kw)

    monkeypatch.setattr(storage.shutil, "copyfile", torn_copy)
    with pytest.raises(
        StorageError, match=r"local put_dir failed for .*new: OSError: No space left on device"
    ):
        storage.put_dir(src, str(tmp_path / "store" / "new"))
    assert not (tmp_path / "store" / "new").exists() and not storage.is_complete(
        str(tmp_path / "store" / "new")
    )
    n["calls"] = 1
    with pytest.raises(StorageError, match=r"local put_file failed for .*x\.bin: OSError: No space left"):
        storage.put_file(src / "a.bin", str(tmp_path / "store" / "x.bin"))
    assert not (tmp_path / "store" / "x.bin").exists()
    n["calls"] = 1
    with pytest.raises(StorageError, match=r"local get_file failed for .*old/a\.bin: OSError: No space"):
        storage.get_dir(str(tmp_path / "store" / "old"), tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    assert leftovers(tmp_path) == []


def test_cli_data_step_on_a_full_disk_exits_1(dataset, tmp_path, monkeypatch):
    def full(table, where, **kw):
        raise enospc(where)

    monkeypatch.setattr(data_io.pq, "write_table", full)
    (tmp_path / "raw").mkdir()
    dataset.rename(tmp_path / "raw" / "in")
    out = tmp_path / "filtered"
    args = ["data", "filter", "--in", str(tmp_path / "raw"), "--out", str(out)]
    res = CliRunner().invoke(_app(), args, env={"COLUMNS": "400"})
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "No space left on device" in text, text
    assert not (out / "in").exists() and leftovers(tmp_path) == []


def test_stale_extension_build_lock_is_removed(tmp_path, monkeypatch):
    """A JIT-build lock left by a killed process would make every later run wait forever: an old one is
    removed, a fresh one (a build in progress) is kept."""
    import os
    import time

    from tasks.train import launch

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir()
        lock.touch()
    past = time.time() - launch.STALE_BUILD_LOCK_S - 60
    os.utime(old, (past, past))
    assert launch.ensure_torch_extensions_dir() == tmp_path
    assert not old.exists() and fresh.exists()
