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


def test_each_rank_decodes_only_the_images_of_its_micro_batches(data_root):
    """Every rank draws the whole global batch (the token clock counts all of it) but decodes the images of
    its own micro-batches only: with 2 data-parallel ranks each decodes its half, counted; the patches equal
    an eager decode; a sequence-parallel slice decodes only its own images."""
    import torch

    from kimivl_model.config import preset
    from kimivl_model.vlm import KimiVL

    root, _ = data_root
    names = ["caption", "interleaved", "ocr", "grounding"]
    cfg = MixtureConfig(
        sources=[SourceSpec(name=n, path=root / "tokenized" / n, weight=1.0) for n in names],
        seq_len=512,
        micro_batch_tokens=512,
        seed=0,
    )
    loaders = [PackedLoader(cfg) for _ in range(2)]  # two ranks, the same mixture and seed
    decoded, total = [0, 0], 0
    for _ in range(3):  # 3 global batches of 4 micro-batches
        per_rank = [[next(ld) for _ in range(4)] for ld in loaders]
        total += sum(int(b["grid_hws"].shape[0]) for b in per_rank[0])
        for rank, batches in enumerate(per_rank):
            for b in batches[rank::2]:  # TrainEngine.local_batches with 2 data-parallel ranks
                before = loaders[rank].images_decoded
                pv = b["pixel_values"]
                assert loaders[rank].images_decoded - before == b["grid_hws"].shape[0]
                assert b["pixel_values"] is pv  # decoded once
                assert pv.shape[0] == int((b["grid_hws"][:, 0] * b["grid_hws"][:, 1]).sum())
    decoded = [ld.images_decoded for ld in loaders]
    assert total > 10 and sum(decoded) == total and min(decoded) > 0, (decoded, total)
    # lazily decoded patches equal a fresh loader's; a batch rank 0 never decoded decodes like rank 1's
    fresh = PackedLoader(cfg)
    for _ in range(8):
        next(fresh)
    assert torch.equal(next(fresh)["pixel_values"], per_rank[0][0]["pixel_values"])
    assert torch.equal(per_rank[0][1]["pixel_values"], per_rank[1][1]["pixel_values"])
    # sequence parallel: a slice decodes only the images whose placeholders it holds
    model = KimiVL(preset("tiny"))
    lazy = PackedLoader(cfg)
    b = next(b for b in (next(lazy) for _ in range(20)) if b["grid_hws"].shape[0] >= 2)
    before = lazy.images_decoded
    parts = [model.shard_batch(b, r, 2) for r in range(2)]
    assert lazy.images_decoded - before == sum(p["grid_hws"].shape[0] for p in parts)
    assert sum(p["grid_hws"].shape[0] for p in parts) <= b["grid_hws"].shape[0] + 1


def test_caption_batches_decode_on_the_rank_that_trains_on_them(data_root):
    """The ViT stage's image-caption batches: grids from the stored sizes, pixels decoded on first read
    only (counted), equal to the patchifier's at the scheduled resolution."""
    import torch

    from tasks.train.coca_loader import CaptionLoader

    root, _ = data_root
    cfg = MixtureConfig(
        sources=[SourceSpec(name=n, path=root / "tokenized" / n, weight=1.0) for n in ("caption", "ocr")],
        seq_len=512,
        micro_batch_tokens=512,
        seed=0,
    )
    loader = CaptionLoader(cfg, 4, 64, [(0.5, 64), (1.0, 256)], token_budget=4000)
    batches = [next(loader) for _ in range(6)]
    assert loader.images_decoded == 0 and sum(b["tokens"]["image"] for b in batches) > 0
    mine = batches[1::2]  # one of 2 data-parallel ranks
    for b in mine:
        g = b["grid_hws"]
        assert b["pixel_values"].shape[0] == int((g[:, 0] * g[:, 1]).sum())
    assert loader.images_decoded == 4 * len(mine)
    # the scheduled resolution holds (<= 64 patches per image in the first half of the budget), and a
    # second loader's lazily decoded first batch equals this one's
    first = batches[0]
    assert all(int(h) * int(w) <= 64 for h, w in first["grid_hws"].tolist())
    again = next(CaptionLoader(cfg, 4, 64, [(0.5, 64), (1.0, 256)], token_budget=4000))
    assert torch.equal(again["pixel_values"], first["pixel_values"])
    assert torch.equal(again["caption_ids"], first["caption_ids"])
