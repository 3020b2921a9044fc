"""Manifests (lineage, skip rule, integrity) and atomic dataset directories."""

import json

import pyarrow as pa
import pytest

from tasks.data.io import DatasetError, ShardWriter, count_rows, iter_rows, read_table
from tasks.io.files import staged_dir
from tasks.io.manifest import (
    ManifestError,
    Parent,
    config_hash,
    is_up_to_date,
    read_manifest,
    verify_files,
    write_manifest,
)

SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("x", pa.int64())])


def _write(out, n, cfg=None, parents=None):
    with staged_dir(out) as stage:
        w = ShardWriter(stage, SCHEMA, rows_per_shard=3)
        w.write_many({"id": f"r{i}", "x": i} for i in range(n))
        w.close()
        return write_manifest(
            stage, kind="dataset", step="t", config=cfg or {"a": 1}, parents=parents, counts={"rows": n}
        )


def test_content_hash_is_deterministic_and_content_sensitive(tmp_path):
    a = _write(tmp_path / "a", 7)
    b = _write(tmp_path / "b", 7)
    c = _write(tmp_path / "c", 8)
    assert a.content_hash == b.content_hash != c.content_hash
    assert count_rows(tmp_path / "a") == 7 and len(list((tmp_path / "a").glob("part-*.parquet"))) == 3
    assert [r["x"] for r in iter_rows(tmp_path / "a", SCHEMA)] == list(range(7))
    assert read_table(tmp_path / "a", SCHEMA).num_rows == 7


def test_skip_rule_needs_same_config_parents_and_intact_files(tmp_path):
    out = tmp_path / "d"
    parent = Parent(uri="file:///x", content_hash="abc")
    _write(out, 5, cfg={"a": 1}, parents=[parent])
    assert is_up_to_date(out, config={"a": 1}, parents=[parent])
    assert is_up_to_date(out, config={"a": 1}, parents=[Parent(uri="/moved", content_hash="abc")])
    assert not is_up_to_date(out, config={"a": 2}, parents=[parent])
    assert not is_up_to_date(out, config={"a": 1}, parents=[Parent(uri="file:///x", content_hash="zzz")])
    # tamper with a shard: integrity check fails, so the step reruns
    shard = sorted(out.glob("part-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-5] + b"xxxxx")
    with pytest.raises(ManifestError, match="content differs"):
        verify_files(out)
    assert not is_up_to_date(out, config={"a": 1}, parents=[parent])


def test_failed_step_leaves_no_output_and_keeps_the_previous_one(tmp_path):
    out = tmp_path / "d"
    first = _write(out, 4)
    with pytest.raises(RuntimeError), staged_dir(out) as stage:
        (stage / "part-00000.parquet").write_bytes(b"half")
        raise RuntimeError("killed")
    assert read_manifest(out).content_hash == first.content_hash
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_manifest_and_wrong_schema_are_named(tmp_path):
    with pytest.raises(ManifestError, match="missing"):
        read_manifest(tmp_path)
    _write(tmp_path / "d", 2)
    other = pa.schema([pa.field("id", pa.string(), nullable=False)])
    with pytest.raises(DatasetError, match=r"part-00000\.parquet: schema differs"):
        list(iter_rows(tmp_path / "d", other))
    w = ShardWriter(tmp_path / "bad", SCHEMA)
    w.write({"id": None, "x": "not-an-int"})
    with pytest.raises(DatasetError, match="does not fit the schema"):
        w.close()


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    m = json.loads(json.dumps({"k": 1}))
    assert config_hash(m) == config_hash({"k": 1})


def _repo_env() -> dict[str, str]:
    import os
    from pathlib import Path

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def test_safetensors_bytes_do_not_depend_on_the_process(tmp_path):
    """The same tensors and metadata give the same file bytes in every process (safetensors writes its
    metadata map in hash-map order; save_safetensors_atomic canonicalises it), so a resumed run's
    checkpoint hashes equal an uninterrupted run's."""
    import hashlib
    import subprocess
    import sys

    code = (
        "import sys, torch; from pathlib import Path; from tasks.io.weights import save_safetensors_atomic; "
        "save_safetensors_atomic({'a': torch.arange(6.0), 'b': torch.ones(2, 3)}, Path(sys.argv[1]), "
        "metadata={'step': '4', 'format': 'pt', 'phase': 'x', 'zz': '1'})"
    )
    digests = set()
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        subprocess.run(
            [sys.executable, "-c", code, str(p)], check=True, cwd=str(tmp_path.parents[0]), env=_repo_env()
        )
        digests.add(hashlib.sha256(p.read_bytes()).hexdigest())
    assert len(digests) == 1
