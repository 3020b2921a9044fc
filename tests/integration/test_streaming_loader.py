"""The training input as a stream: tokenized Lance datasets read by row, each rank reading only the
micro-batches it trains on, DataLoader workers reading and decoding ahead, exact resume with another number
of workers, and the same batches from S3 as from disk."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.data.loader import MixtureConfig, PackedLoader, SourceSpec

NAMES = ("caption", "interleaved", "text", "video_qa", "sft")


def mixture(root, names=NAMES, **kw) -> MixtureConfig:
    base = {
        "sources": [SourceSpec(name=n, path=root / "tokenized" / n, weight=1.0) for n in names],
        "seq_len": 512,
        "micro_batch_tokens": 1024,
        "seed": 3,
        "pack_buffer_docs": 8,
    }
    return MixtureConfig(**{**base, **kw})


def full(batch) -> dict[str, torch.Tensor]:
    """Every field of a batch (reading it if it was not)."""
    return {k: batch[k] for k in batch}


def assert_same(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), where
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{where}: {k}"


def reference(cfg: MixtureConfig, n: int) -> tuple[list[dict], list[dict]]:
    """n batches of one in-process loader (every field) and its state after each."""
    loader = PackedLoader(cfg)
    batches, states = [], []
    for _ in range(n):
        batches.append(full(next(loader)))
        states.append(json.loads(json.dumps(loader.state_dict())))
    return batches, states


def test_a_rank_reads_only_its_micro_batches(tiny_data):
    """Planning needs no tokens: batch boundaries, sources and token counts exist before any read; each of
    2 data-parallel ranks reads (and decodes) the documents of its own half only."""
    root, _ = tiny_data
    cfg = mixture(root)
    want, _ = reference(cfg, 8)
    loaders = [PackedLoader(cfg), PackedLoader(cfg)]
    for rank, ld in enumerate(loaders):
        batches = [next(ld) for _ in range(8)]
        assert ld.batches_read == 0 and ld.images_decoded == 0
        for i, b in enumerate(batches):
            for k in (
                "cu_seqlens",
                "position_ids",
                "source_ids",
                "token_counts",
                "grid_hws",
                "image_is_video",
            ):
                assert torch.equal(b[k], want[i][k]), k  # known before reading
            if i % 2 == rank:
                assert_same(full(b), want[i], f"rank {rank} batch {i}")
        assert ld.batches_read == 4
        assert [b.loaded for b in batches] == [i % 2 == rank for i in range(8)]
    images = sum(int(b["grid_hws"].shape[0]) for b in want)
    assert images > 0 and sum(ld.images_decoded for ld in loaders) == images


def test_workers_read_ahead_and_resume_exactly_with_another_worker_count(tiny_data):
    """Rank 1 of 2 with 2 workers gets the batches of one process, its state after each batch is the
    in-process loader's (not the planner's look-ahead), and resuming from a mid-run state with 1 worker
    continues identically; batches of the other rank stay unread."""
    root, _ = tiny_data
    cfg = mixture(root)
    want, states = reference(cfg, 9)

    def is_local(b: int) -> bool:
        return b % 2 == 1

    loader = PackedLoader(cfg)
    loader.use_workers(2, is_local, prefetch=2)
    saved = None
    for i in range(5):
        b = next(loader)
        assert b.loaded == is_local(i)
        if is_local(i):
            assert_same(dict(b._fields, pixel_values=b["pixel_values"]), want[i], f"batch {i}")
        assert json.loads(json.dumps(loader.state_dict())) == states[i], i
        if i == 2:
            saved = json.loads(json.dumps(loader.state_dict()))
    assert loader.batches_read == 2
    assert loader.images_decoded == sum(int(want[i]["grid_hws"].shape[0]) for i in (1, 3))

    resumed = PackedLoader(cfg)
    resumed.use_workers(1, is_local, prefetch=3)
    resumed.load_state_dict(saved)
    for i in range(3, 9):
        b = next(resumed)
        assert_same(full(b), want[i], f"resumed batch {i}")  # unread ones read lazily here: same
        assert resumed.state_dict() == states[i]
    # and back to no workers from a state saved with workers
    plain = PackedLoader(cfg)
    plain.load_state_dict(saved)
    assert_same(full(next(plain)), want[3], "no workers")


def test_inconsistent_counts_are_an_error_naming_the_documents(tiny_data, tmp_path):
    """Tokens that disagree with the counts the sampler planned by (a corrupted dataset) stop the batch."""
    from tasks.data.loader import SequencePlan, read_sequences, token_fields

    root, _ = tiny_data
    loader = PackedLoader(mixture(root, names=("text",)))
    plan: SequencePlan = loader.next_plan()
    seqs = read_sequences(loader._by_name, [plan.refs()], loader.cfg.seq_len)
    assert token_fields(seqs, [plan.expected()])["input_ids"].numel() == plan.num_tokens  # consistent: fine
    wrong = [(plan.num_tokens + 1, *plan.expected()[1:])]
    with pytest.raises(ValueError, match="documents .* differ from the dataset's recorded counts"):
        token_fields(seqs, wrong)


def test_s3_source_gives_the_batches_of_the_local_dataset(tiny_data, s3_server, monkeypatch):
    """The same tokenized datasets uploaded to S3 (SeaweedFS, signed requests) give identical batches,
    through workers too; the S3 options never carry the secret into an error message."""
    from tasks.io.storage import put_dir

    root, _ = tiny_data
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    names = ("caption", "text", "video_qa")
    cfg = mixture(root, names=names)
    want, _ = reference(cfg, 4)
    prefix = f"s3://{s3_server.buckets[0]}/stream-test"
    for n in names:
        put_dir(root / "tokenized" / n, f"{prefix}/tokenized/{n}")
    s3cfg = MixtureConfig(
        **{
            **cfg.model_dump(),
            "sources": [{"name": n, "path": f"{prefix}/tokenized/{n}", "weight": 1.0} for n in names],
        }
    )
    loader = PackedLoader(s3cfg)
    for i in range(2):
        assert_same(full(next(loader)), want[i], f"s3 batch {i}")
    loader.use_workers(1, lambda b: True)
    for i in range(2, 4):
        assert_same(full(next(loader)), want[i], f"s3 worker batch {i}")
    missing = SourceSpec(name="text", path=f"{prefix}/tokenized/nope", weight=1.0)
    with pytest.raises(FileNotFoundError, match="nope") as e:
        PackedLoader(MixtureConfig(**{**cfg.model_dump(), "sources": [missing]}))
    assert s3_server.secret_key not in str(e.value)


def _on_s3(root, s3_server, names, tag: str) -> MixtureConfig:
    """``mixture(root, names)`` with its sources uploaded to S3 under a prefix of their own."""
    from tasks.io.storage import put_dir

    prefix = f"s3://{s3_server.buckets[0]}/{tag}"
    for n in names:
        put_dir(root / "tokenized" / n, f"{prefix}/tokenized/{n}")
    sources = [{"name": n, "path": f"{prefix}/tokenized/{n}", "weight": 1.0} for n in names]
    return MixtureConfig(**{**mixture(root, names=names).model_dump(), "sources": sources})


def test_s3_faults_mid_epoch_are_retried_or_stop_clearly_and_resume_exactly(
    tiny_data, s3_server, monkeypatch
):
    """Behind a fault-injecting proxy: 500s on reads of the Lance data files are retried (same batches);
    an endpoint that stalls every read stops the batch with an error naming the dataset (never the secret),
    and a loader restored from the last served state continues with exactly the reference batches: nothing
    skipped, nothing read twice (the token counts add up)."""
    from tasks.data.io import DatasetError
    from tests.integration.s3_proxy import Proxy

    root, _ = tiny_data
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    names = ("caption", "text")
    cfg = _on_s3(root, s3_server, names, "faults")
    want, states = reference(mixture(root, names=names), 8)
    mode = {"fault": "500", "budget": 0}

    def rule(method: str, path: str, seen: int):
        if method == "GET" and "/data/" in path and mode["budget"] > 0:
            mode["budget"] -= 1
            return mode["fault"]
        return "forward"

    proxy = Proxy(s3_server.endpoint_url, rule)
    monkeypatch.setenv("KIMIVL_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("KIMIVL_S3_MAX_ATTEMPTS", "2")
    with proxy.running(max_lifetime=240):
        monkeypatch.setenv("KIMIVL_S3_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        loader = PackedLoader(cfg)
        got = [full(next(loader)) for _ in range(2)]
        mode["budget"] = 2  # two 500s: retried
        got += [full(next(loader)) for _ in range(2)]
        assert proxy.count("GET", "/data/", "500") == 2
        for i, b in enumerate(got):
            assert_same(b, want[i], f"batch {i}")
        saved = loader.state_dict()
        mode.update(fault="stall", budget=10**6)  # every data read stalls from now on
        with pytest.raises(DatasetError, match="faults/tokenized/.*reading rows failed") as e:
            full(next(loader))
        assert s3_server.secret_key not in str(e.value)
        mode["budget"] = 0  # the endpoint recovers; restart from the last state served
        resumed = PackedLoader(cfg)
        resumed.load_state_dict(saved)
        rest = [full(next(resumed)) for _ in range(4)]
    for i, b in enumerate(rest, start=4):
        assert_same(b, want[i], f"resumed batch {i}")
    tokens = sum(int(b["token_counts"].sum()) for b in got + rest)
    assert (
        tokens == sum(int(b["token_counts"].sum()) for b in want) == sum(b["input_ids"].numel() for b in want)
    )
    assert states[3] == saved


def test_a_corrupt_image_read_by_a_worker_names_its_document(tmp_path):
    """A dataset whose image bytes do not decode (tokenize reads only the stored sizes): the batch that
    holds it fails in the worker, and the error the training process sees names the source and document."""
    from tasks.data.images import ImageDecodeError
    from tasks.data.tokenize import TokenizeConfig, run_tokenize
    from tasks.data.tokenizer import TokenizerConfig, run_train_tokenizer
    from tests.unit.data.records import make_record, picture, write_dataset

    bad = {"data": b"\x89PNG not really", "width": 56, "height": 56, "format": "png"}
    rows = [
        make_record(f"ok{i}", text=f"<image> a red ball {i}", images=[picture(i + 1, (56, 56))])
        for i in range(6)
    ]
    rows.append(make_record("broken", text="<image> a red ball", images=[bad]))
    write_dataset(tmp_path / "rec", rows)
    run_train_tokenizer([tmp_path / "rec"], tmp_path / "tok", TokenizerConfig(vocab_size=300))
    run_tokenize(tmp_path / "rec", tmp_path / "tok", tmp_path / "cap", TokenizeConfig())
    cfg = MixtureConfig(
        sources=[SourceSpec(name="cap", path=tmp_path / "cap", weight=1.0)],
        seq_len=512, micro_batch_tokens=512, pack_buffer_docs=8,
    )  # fmt: skip
    loader = PackedLoader(cfg)
    loader.use_workers(1, lambda b: True)
    with pytest.raises(ImageDecodeError, match=r"source 'cap' \(documents \[.*'broken'"):
        for _ in range(4):
            next(loader)
