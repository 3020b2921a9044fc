"""A launched phase reading its data from S3: 2 ranks, each reading its own micro-batches from SeaweedFS
through a DataLoader worker, train like 1 rank reading the same datasets from disk."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_launch_sequence_parallel import assert_launched_weights_match, launch_phase

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_two_ranks_reading_s3_through_workers_train_like_one_rank_reading_disk(
    tiny_data, s3_server, tmp_path, monkeypatch
):
    from tasks.io.storage import put_dir
    from tests.integration.conftest import short_recipe

    for k, v in s3_server.env().items():  # the launched ranks inherit them
        monkeypatch.setenv(k, v)
    root = tiny_data[0]
    prefix = f"s3://{s3_server.buckets[0]}/launch-data"
    for s in short_recipe().phase("joint_pretrain").sources:
        put_dir(root / "tokenized" / s.name, f"{prefix}/tokenized/{s.name}")
    recipe, ref_loss, ref_w, ref = launch_phase(tiny_data, tmp_path, "disk", 1)
    _, loss, got_w, got = launch_phase(
        tiny_data, tmp_path, "s3", 2, train={"data_workers": 1}, data_root=prefix
    )
    assert len(ref_loss) >= 4 and loss == pytest.approx(ref_loss, rel=1e-5)
    for key in ("steps", "tokens", "tokens_by_source"):
        assert got[key] == ref[key], key
    assert ref["tokens"]["image"] > 0
    assert_launched_weights_match(got_w, ref_w, recipe)
    manifest = json.loads((tmp_path / "s3/phases/joint_pretrain/final/manifest.json").read_text())
    assert any(p["uri"].startswith(f"{prefix}/tokenized/") for p in manifest["parents"])  # lineage: S3
