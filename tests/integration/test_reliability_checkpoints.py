"""Checkpoint integrity: corruption is detected on load with an error naming the file, and nothing in a
checkpoint can run code.

- engine checkpoints (``tasks/train/checkpoint.py``): sha256 of every file in ``checksums.json``; a flipped
  byte, a truncated, missing or replaced file is a ``CheckpointError`` naming it; optimizer/RNG state is read
  with ``torch.load(weights_only=True)``, so a pickle payload is refused even when its checksum was forged;
- native checkpoints / a phase's ``final/`` (``tasks/io/weights.py``): verified against their manifest, and a
  phase refuses to start from a corrupted parent (``kimivl stage`` exits 1 naming the file);
- weights are safetensors only; no ``torch.load`` without ``weights_only=True`` and no ``pickle`` anywhere.

``tests/integration/test_engine_checkpoints.py::test_corrupted_or_missing_file_is_named`` covers flipped bytes and a
missing file of an engine checkpoint; this file adds the other damage and the pickle payloads.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kimivl_model.config import preset
from kimivl_model.vlm import KimiVL
from tasks.io.manifest import write_manifest
from tasks.io.weights import CheckpointIntegrityError, load_native, save_native
from tasks.train import checkpoint as ckpt
from tasks.train.checkpoint import CheckpointError, checkpoint_path, torch_load_plain

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this calls ``Path.write_text(marker, "pwned")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ------------------------------------------------------------------------------------------- pickle
def test_the_payload_is_live_and_torch_load_plain_refuses_it(tmp_path):
    marker = tmp_path / "marker"
    # the payload is live: what unpickling would call (never unpickled here) writes the proof file
    fn, args = Payload(tmp_path / "proof").__reduce__()
    fn(*args)
    assert (tmp_path / "proof").read_text() == "pwned"

    evil = tmp_path / "evil.pt"
    torch.save({"kind": "torch", "state_dict": {"state": {0: Payload(marker)}}}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt: cannot be loaded with weights_only=True"):
        torch_load_plain(evil)
    assert not marker.exists()


RESTRICTED_UNPICKLER = REPO / "tasks/train/sharded_checkpoint.py"  # DCP's .metadata is a pickle


def test_no_unsafe_deserialisation_in_the_code():
    """Every ``torch.load`` passes ``weights_only=True``; nothing imports pickle/dill/joblib/cloudpickle,
    except the sharded checkpoint reader, which unpickles DCP's metadata with an allow-list ``find_class``
    and never calls the module-level (unrestricted) pickle readers."""
    offenders = []
    source = RESTRICTED_UNPICKLER.read_text()
    unrestricted = [f"pickle.{fn}(" for fn in ("load", "loads")]  # the module-level, unrestricted readers
    assert "def find_class(" in source and not any(call in source for call in unrestricted)
    for root in ("tasks", "flows", "kimivl_model", "data_contracts"):
        for path in (REPO / root).rglob("*.py"):
            if path == RESTRICTED_UNPICKLER:
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    wo = [kw.value for kw in node.keywords if kw.arg == "weights_only"]
                    if not (wo and isinstance(wo[0], ast.Constant) and wo[0].value is True):
                        offenders.append(f"{path}:{node.lineno} torch.load without weights_only=True")
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    if any(n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for n in names):
                        offenders.append(f"{path}:{node.lineno} imports {names}")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------- engine checkpoints
@pytest.fixture(scope="module")
def engine_ckpt(tmp_path_factory) -> Path:
    """A real 2-step engine checkpoint (muon, ZeRO 0) of the tiny MoE LM used by test_engine.py."""
    from tasks.train.engine import TrainEngine
    from tests.integration._engine_worker import engine_config, loss_fn, make_model, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        eng = TrainEngine(model, engine_config("muon", 0), loss_fn)
        train(eng, model, 0, 2)
        root = tmp_path_factory.mktemp("engine-ckpt")
        return eng.save_checkpoint(checkpoint_path(root, 2), {"next_step": 2})
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory) -> Path:
    """The same checkpoint in the sharded format (``checkpoint_format: sharded``, DCP files)."""
    from tasks.train.engine import TrainEngine
    from tests.integration._engine_worker import engine_config, loss_fn, make_model, train

    cfg = engine_config("muon", 0).model_copy(update={"checkpoint_format": "sharded"})
    model = make_model()
    eng = TrainEngine(model, cfg, loss_fn)
    train(eng, model, 0, 2)
    return eng.save_checkpoint(checkpoint_path(tmp_path_factory.mktemp("sharded-ckpt"), 2), {"next_step": 2})


def fresh_engine():
    from tasks.train.engine import TrainEngine
    from tests.integration._engine_worker import engine_config, loss_fn, make_model

    return TrainEngine(make_model(seed=7), engine_config("muon", 0), loss_fn)


def forge_checksums(directory: Path) -> None:
    """What an attacker who can write the checkpoint would do: make checksums.json match again."""
    sums = ckpt.read_checksums(directory)
    ckpt.write_checksums(directory, ckpt.checksums(directory, list(sums)))


DAMAGE = {
    "truncated weights": ("model.safetensors", truncate, "sha256 mismatch"),
    "truncated optimizer state": ("optimizer/rank-00000.pt", truncate, "sha256 mismatch"),
    "flipped byte in trainer state": ("trainer_state.json", lambda p: flip(p, 0.3), "sha256 mismatch"),
    "missing optimizer state": ("optimizer/rank-00000.pt", Path.unlink, "missing from the checkpoint"),
    "missing weights": ("model.safetensors", Path.unlink, "missing from the checkpoint"),
    "garbage checksums": ("checksums.json", lambda p: p.write_text("{not json"), "unreadable checksum file"),
    "optimizer state replaced": (
        "optimizer/rank-00000.pt",
        lambda p: torch.save({"kind": "torch", "state_dict": {}}, p),
        "sha256 mismatch",
    ),
}


SHARDED_DAMAGE = {
    "truncated data file": ("state/__0_0.distcp", truncate, "sha256 mismatch"),
    "flipped byte in the data": ("state/__0_0.distcp", lambda p: flip(p, 0.6), "sha256 mismatch"),
    "flipped byte in the metadata": ("state/.metadata", lambda p: flip(p, 0.5), "sha256 mismatch"),
    "missing metadata": ("state/.metadata", Path.unlink, "missing from the checkpoint"),
    "missing RNG state": ("rng/rank-00000.pt", Path.unlink, "missing from the checkpoint"),
}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("fmt", "case"), [("gathered", c) for c in DAMAGE] + [("sharded", c) for c in SHARDED_DAMAGE]
)
def test_damaged_engine_checkpoint_is_refused_naming_the_file(request, tmp_path, fmt, case):
    good = request.getfixturevalue("engine_ckpt" if fmt == "gathered" else "sharded_ckpt")
    victim, damage, message = (DAMAGE if fmt == "gathered" else SHARDED_DAMAGE)[case]
    bad = tmp_path / good.name
    shutil.copytree(good, bad)
    damage(bad / victim)
    eng = fresh_engine()
    before = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
    with pytest.raises(CheckpointError, match=message) as info:
        eng.load_checkpoint(bad)
    assert str(bad / victim) in str(info.value)
    assert eng.step == 0  # nothing was applied
    assert all(torch.equal(before[n], p) for n, p in eng.model.named_parameters())


@pytest.mark.integration
def test_code_in_sharded_metadata_is_refused_even_with_forged_checksums(sharded_ckpt, tmp_path):
    """A checkpoint writer who also forges checksums.json: DCP's pickled metadata still runs no code."""
    import pickle

    bad = tmp_path / sharded_ckpt.name
    shutil.copytree(sharded_ckpt, bad)
    marker = tmp_path / "pwned-dcp.txt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (bad / "state" / ".metadata").write_bytes(pickle.dumps(Payload()))
    forge_checksums(bad)
    with pytest.raises(CheckpointError, match="refused global"):
        fresh_engine().load_checkpoint(bad)
    assert not marker.exists()


@pytest.mark.integration
def test_pickle_payload_as_optimizer_state_is_refused_even_with_forged_checksums(engine_ckpt, tmp_path):
    bad = tmp_path / engine_ckpt.name
    shutil.copytree(engine_ckpt, bad)
    marker = tmp_path / "pwned.txt"
    opt = bad / "optimizer" / "rank-00000.pt"
    real = torch.load(opt, weights_only=True)
    real["state_dict"]["state"][0]["evil"] = Payload(marker)  # a real state with one poisoned entry
    torch.save(real, opt)

    with pytest.raises(CheckpointError, match="sha256 mismatch"):  # the checksum catches it first
        fresh_engine().load_checkpoint(bad)
    forge_checksums(bad)
    with pytest.raises(
        CheckpointError, match=r"optimizer/rank-00000\.pt: cannot be loaded with weights_only"
    ):
        fresh_engine().load_checkpoint(bad)
    (bad / "rng" / "rank-00000.pt").write_bytes(opt.read_bytes())  # and as RNG state
    forge_checksums(bad)
    with pytest.raises(CheckpointError, match="weights_only"):
        fresh_engine().load_checkpoint(bad)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- native / final
@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("native") / "ckpt"
    torch.manual_seed(0)
    save_native(KimiVL(preset("tiny")).state_dict(), preset("tiny"), d)
    return d


NATIVE_DAMAGE = {
    "flipped byte in the tensors": ("model.safetensors", lambda p: flip(p, 0.7), "content differs"),
    "flipped byte in the header": ("model.safetensors", lambda p: flip(p, 0.0001), "content differs"),
    "truncated weights": ("model.safetensors", truncate, "content differs"),
    "missing weights": ("model.safetensors", Path.unlink, "missing"),
    "edited config": (
        "kimivl_config.json",
        lambda p: p.write_text(p.read_text().replace("1", "2", 1)),
        "differs",
    ),
}


@pytest.mark.parametrize("case", list(NATIVE_DAMAGE))
def test_native_checkpoint_is_verified_against_its_manifest(native, tmp_path, case):
    victim, damage, message = NATIVE_DAMAGE[case]
    assert (native / "manifest.json").is_file()
    load_native(native)  # intact: loads
    bad = tmp_path / "ckpt"
    shutil.copytree(native, bad)
    damage(bad / victim)
    with pytest.raises(CheckpointIntegrityError, match=message) as info:
        load_native(bad)
    assert str(bad / victim) in str(info.value)


def test_unreadable_safetensors_without_a_manifest_is_named(native, tmp_path):
    """A checkpoint made elsewhere (no manifest): a truncated file is still a named error, not a crash."""
    bad = tmp_path / "ckpt"
    shutil.copytree(native, bad)
    (bad / "manifest.json").unlink()
    truncate(bad / "model.safetensors")
    with pytest.raises(
        CheckpointIntegrityError, match=r"model\.safetensors: not a readable safetensors file"
    ):
        load_native(bad)


def test_next_phase_refuses_a_corrupted_parent_checkpoint(native, tmp_path):
    """`kimivl stage vit` after a text_pretrain whose final/model.safetensors was damaged: exit 1, file named,
    and the vit phase writes no checkpoint."""
    from flows.cli import app

    out = tmp_path / "run"
    final = out / "phases" / "text_pretrain" / "final"
    shutil.copytree(native, final)
    (final / "manifest.json").unlink()
    (final / "result.json").write_text(json.dumps({"phase": "text_pretrain", "schedule_end_step": 10}))
    write_manifest(final, kind="checkpoint", step="train:text_pretrain", config={})
    flip(final / "model.safetensors", 0.6)
    (tmp_path / "data" / "tokenized").mkdir(parents=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "params.yaml").read_text())
    assert yaml.safe_load(recipe.read_text())["phases"][1]["name"] == "vit"
    res = CliRunner().invoke(
        app,
        ["stage", "vit", "--recipe", str(recipe), "--data", str(tmp_path / "data"), "--out", str(out)],
        env={"COLUMNS": "400"},
    )
    text = " ".join(res.output.split())
    assert res.exit_code == 1, text
    assert "training stopped" in text and str(final / "model.safetensors") in text and "differs" in text
    assert (
        not (out / "phases" / "vit" / "checkpoints").exists()
        and not (out / "phases" / "vit" / "final").exists()
    )


# ------------------------------------------------------------------------------------------- disk full
def _torn(path) -> OSError:
    Path(path).write_bytes(b"\0" * 64)  # part of the bytes made it before the disk filled up
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.integration
@pytest.mark.parametrize("victim", ["weights", "optimizer state"])
def test_disk_full_during_checkpoint_save_publishes_nothing(tmp_path, monkeypatch, victim):
    from tasks.io import weights as model_io

    eng = fresh_engine()
    root = tmp_path / "checkpoints"
    good = eng.save_checkpoint(checkpoint_path(root, 1), {"next_step": 1})
    if victim == "weights":

        def full(tensors, filename, metadata=None):
            raise _torn(filename)

        monkeypatch.setattr(model_io, "save_file", full)
    else:
        real_save = torch.save

        def full(obj, f, *a, **kw):
            if "optimizer" in str(f):
                raise _torn(f)
            return real_save(obj, f, *a, **kw)

        monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="checkpoint not saved: No space left on device") as info:
        eng.save_checkpoint(checkpoint_path(root, 2), {"next_step": 2})
    assert str(checkpoint_path(root, 2)) in str(info.value) and str(good) in str(info.value)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(root) == good
    assert sorted(p.name for p in root.iterdir()) == [good.name]  # no staging dir, no temp file
    assert fresh_engine().load_checkpoint(good) == {"next_step": 1}


@pytest.mark.integration
def test_checkpoint_into_unwritable_dir_is_a_checkpoint_error(tmp_path):
    (tmp_path / "blocker").write_text("a file where the checkpoint root should be")
    with pytest.raises(CheckpointError, match=r"checkpoint not saved: Not a directory"):
        fresh_engine().save_checkpoint(checkpoint_path(tmp_path / "blocker", 1))
