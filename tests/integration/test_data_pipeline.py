"""The data half of the recipe end to end: counts reconcile at every step, reruns skip, a changed rule
reruns only what depends on it, and the packed tiny mixture is >= 95% real tokens."""

import shutil
from pathlib import Path

import pytest

from tasks.data.loader import MixtureConfig, PackedLoader, SourceSpec
from tasks.data.pipeline import datasets, run_data_all
from tasks.io.manifest import read_manifest
from tests.integration.conftest import SMALL_DATA

SMALL = SMALL_DATA
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_root(tiny_data):
    return tiny_data


def test_counts_reconcile_at_every_step(data_root):
    root, summary = data_root
    for layer in ("filtered", "validated"):
        for name, c in summary[layer].items():
            assert c["accepted"] + c["quarantined"] == c["input"], (layer, name, c)
    for name, c in summary["dedup"].items():
        if name != "synthetic_qa":
            assert c["accepted"] + c["duplicates"] == c["input"], (name, c)
    # what a step accepted is exactly what the next step read
    for name, c in summary["filtered"].items():
        assert summary["dedup"][name]["input"] == c["accepted"]
    for name, c in summary["tokenized"].items():
        assert c["input"] == summary["validated"][name]["accepted"]
    # lineage: every tokenized dataset names its validated parent by content hash
    for d in datasets(root / "tokenized"):
        m = read_manifest(d)
        parents = {p.content_hash for p in m.parents}
        assert read_manifest(root / "validated" / d.name).content_hash in parents
    assert summary["tokens"]["image"] > 0 and summary["tokens"]["video"] > 0 and summary["tokens"]["text"] > 0


def test_rerun_skips_and_changed_rule_reruns_downstream_only(data_root, tmp_path):
    root, _ = data_root
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    before = {
        p: read_manifest(p).content_hash for layer in ("raw", "filtered") for p in datasets(work / layer)
    }
    mtimes = {p: (p / "manifest.json").stat().st_mtime_ns for p in before}
    run_data_all(SMALL, work, log=lambda *_: None)
    assert all((p / "manifest.json").stat().st_mtime_ns == mtimes[p] for p in before)  # nothing rewritten
    stricter = SMALL.model_copy(
        update={
            "filter": SMALL.filter.model_copy(
                update={"rules": SMALL.filter.rules.model_copy(update={"min_chars": 40})}
            )
        }
    )
    run_data_all(stricter, work, log=lambda *_: None)
    raw = [p for p in before if p.parent.name == "raw"]
    assert all((p / "manifest.json").stat().st_mtime_ns == mtimes[p] for p in raw)  # sources untouched
    changed = [
        p for p in before if p.parent.name == "filtered" and read_manifest(p).content_hash != before[p]
    ]
    assert changed, "a stricter min_chars must change some filtered dataset"


def test_same_seed_gives_same_hashes(data_root, tmp_path):
    root, _ = data_root
    run_data_all(SMALL, tmp_path, log=lambda *_: None)
    for layer in ("raw", "validated", "tokenizer"):
        dirs = datasets(root / layer) if layer != "tokenizer" else [root / "tokenizer"]
        for d in dirs:
            other = tmp_path / layer / d.name if layer != "tokenizer" else tmp_path / "tokenizer"
            assert read_manifest(d).content_hash == read_manifest(other).content_hash, d


def test_tiny_mixture_packs_at_least_95_percent_real_tokens(data_root):
    root, _ = data_root
    names = ["text", "caption", "interleaved", "ocr", "grounding", "synthetic_qa"]
    cfg = MixtureConfig(
        sources=[SourceSpec(name=n, path=root / "tokenized" / n, weight=1.0) for n in names],
        seq_len=512,
        micro_batch_tokens=512,
        seed=0,
    )
    loader = PackedLoader(cfg)
    real = 0
    n = 40
    for _ in range(n):
        batch = next(loader)
        real += int(batch["input_ids"].numel())
    assert real / (n * 512) >= 0.95, real / (n * 512)
