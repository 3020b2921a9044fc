"""Every phase of the (shortened) tiny recipe through the generic stage runner, and what each must guarantee:
falling loss, align trains only ViT + projector, the RoPE switch, SFT masking, exact token accounting and
budget stop, resume exactness, missing-parent errors, and 2-process equivalence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kimivl_model.vlm import KimiVL
from tasks.data.loader import PackedLoader, tokens_by_modality, tokens_by_source
from tasks.data.special_tokens import OWN_BPE_IDS, OWN_BPE_SPECIAL_IDS
from tasks.io.manifest import read_manifest
from tasks.io.weights import load_native, load_safetensors
from tasks.train.phase_data import build_loader, by_group, mixture
from tasks.train.runner import MissingParentError, build_model, final_dir, lm_loss, run_phase
from tests.integration.conftest import ROOT, short_recipe

RECIPE = short_recipe()


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    data_root, _ = tiny_data
    out = tmp_path_factory.mktemp("run")
    results = {p.name: run_phase(RECIPE, p, data_root, out, log=lambda *_: None) for p in RECIPE.phases}
    return data_root, out, results


def _weights(out: Path, phase_name: str) -> dict[str, torch.Tensor]:
    return load_safetensors(final_dir(out, RECIPE.phase(phase_name)) / "model.safetensors")


def _phase_loss(model: KimiVL, phase, batch) -> float:
    with torch.no_grad():
        if phase.objective == "coca":
            return float(
                model.coca_forward(
                    batch["pixel_values"],
                    batch["grid_hws"],
                    batch["caption_ids"],
                    batch["caption_cu_seqlens"],
                ).loss
            )
        return float(lm_loss(model, batch).loss_sum) / int((batch["labels"] != -100).sum())


def test_every_phase_runs_and_lowers_the_loss_on_its_data(tiny_run):
    """Loss of the phase's first training batch: the phase's starting model vs its final model."""
    data_root, out, results = tiny_run
    for name, r in results.items():
        assert r["steps"] >= 1 and r["skipped_steps"] == 0, name
        phase = RECIPE.phase(name)
        start, vcfg, _ = build_model(RECIPE, phase, out)
        start.eval()
        batch = next(build_loader(RECIPE, phase, data_root, vcfg))
        before = _phase_loss(start, phase, batch)
        start.load_state_dict(_weights(out, name))
        after = _phase_loss(start, phase, batch)
        assert after < before, (name, before, after)
        m = read_manifest(final_dir(out, phase))  # lineage: parent checkpoint and datasets by hash
        assert m.kind == "checkpoint" and len(m.parents) >= len(phase.sources)


def test_align_changes_only_vit_and_projector(tiny_run):
    _, out, _ = tiny_run
    before, after = _weights(out, "vit"), _weights(out, "align")
    assert not any(k.startswith("coca.") for k in after)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed, "align must train something"
    assert all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in changed), sorted(changed)[
        :5
    ]
    assert any(k.startswith("multi_modal_projector.") for k in changed)
    # the ViT stage trained only the ViT (and the CoCa head): the LM is the text_pretrain LM
    lm = _weights(out, "text_pretrain")
    assert all(torch.equal(before[k], lm[k]) for k in lm if k.startswith("language_model."))


def test_rope_theta_switches_at_long_context_and_stays(tiny_run):
    _, out, results = tiny_run
    thetas = {n: load_native(final_dir(out, RECIPE.phase(n)))[0].lm.rope_theta for n in results}
    assert thetas["cooldown"] == 50_000.0
    for n in ("long_context.1", "long_context.2", "sft.1", "sft.2", "cot_sft"):
        assert thetas[n] == 800_000.0, n


def test_tokens_equal_real_tokens_of_the_batches_seen_and_budget_stops(tiny_run):
    data_root, _, results = tiny_run
    for name in ("joint_pretrain", "sft.1", "vit"):
        phase = RECIPE.phase(name)
        r = results[name]
        loader = build_loader(RECIPE, phase, data_root, RECIPE.model.vlm_config())
        seen = {"text": 0, "image": 0, "video": 0}
        per_source = dict.fromkeys(loader.source_names, 0)
        last = 0
        for _ in range(r["steps"] * phase.micro_batches_per_step):
            b = next(loader)
            t = b["tokens"] if phase.objective == "coca" else tokens_by_modality(b, OWN_BPE_IDS.media_pad)
            last = sum(t[k] for k in seen)
            for k in seen:
                seen[k] += int(t[k])
            src = (
                b["tokens_by_source"]
                if phase.objective == "coca"
                else tokens_by_source(b, loader.source_names)
            )
            assert sum(src.values()) == last, name  # every token of the batch belongs to exactly one source
            for k, v in src.items():
                per_source[k] += v
        assert {k: r["tokens"][k] for k in seen} == seen, name
        assert r["tokens_by_source"] == per_source, name
        assert r["tokens_by_group"] == by_group(phase, per_source), name
        assert sum(r["tokens_by_group"].values()) == r["tokens"]["total"], name
        total = sum(seen.values())
        assert total >= phase.token_budget > total - last, name  # stopped at the first step past the budget


def test_sft_loss_gradient_from_user_and_system_tokens_is_zero(tiny_run):
    data_root, out, _ = tiny_run
    phase = RECIPE.phase("sft.1")
    cfg, sd = load_native(final_dir(out, phase))
    model = KimiVL(cfg, attn_backend="sdpa")
    model.load_state_dict(sd)
    batch = next(PackedLoader(mixture(RECIPE, phase, data_root)))
    ids, labels = batch["input_ids"], batch["labels"]
    # positions whose NEXT token is inside a user/system turn must not be targets
    in_prompt = torch.zeros_like(ids, dtype=torch.bool)
    state = None
    for i, t in enumerate(ids.tolist()):
        if t in (OWN_BPE_SPECIAL_IDS["<|im_user|>"], OWN_BPE_SPECIAL_IDS["<|im_system|>"]):
            state = "prompt"
        elif t == OWN_BPE_SPECIAL_IDS["<|im_assistant|>"]:
            state = "answer"
        if state == "prompt" and i > 0:
            in_prompt[i - 1] = True
        if t == OWN_BPE_SPECIAL_IDS["<|im_end|>"]:
            state = None
    assert in_prompt.any()
    assert (labels[in_prompt] == -100).all()
    embeds = model.embed(ids, batch["pixel_values"], batch["grid_hws"]).detach().requires_grad_(True)
    out_ = model.language_model(
        inputs_embeds=embeds,
        cu_seqlens=batch["cu_seqlens"],
        position_ids=batch["position_ids"],
        labels=labels,
    )
    logits_grad = torch.autograd.grad(out_.loss, out_.logits)[0]
    assert torch.count_nonzero(logits_grad[labels == -100]) == 0
    assert torch.count_nonzero(logits_grad[labels != -100]) > 0


def test_resume_after_interruption_continues_the_identical_trajectory(tiny_data, tiny_run, tmp_path):
    data_root, ref_out, results = tiny_run
    phase = RECIPE.phase("joint_pretrain")
    work = tmp_path / "resume"
    for prev in RECIPE.phases[: list(RECIPE.phases).index(phase)]:  # reuse the parents of the phase
        (work / "phases").mkdir(parents=True, exist_ok=True)
        os.symlink(ref_out / "phases" / prev.name, work / "phases" / prev.name)
    part = run_phase(RECIPE, phase, data_root, work, log=lambda *_: None, stop_after_steps=6)
    assert part["interrupted_at_step"] == 6
    assert not (final_dir(work, phase) / "result.json").exists()
    resumed = run_phase(RECIPE, phase, data_root, work, log=lambda *_: None)
    ref = results["joint_pretrain"]
    assert resumed["tokens"] == ref["tokens"] and resumed["steps"] == ref["steps"]
    assert resumed["tokens_by_source"] == ref["tokens_by_source"]
    assert resumed["final_loss"] == ref["final_loss"]
    a = load_safetensors(final_dir(work, phase) / "model.safetensors")
    b = _weights(ref_out, "joint_pretrain")
    assert all(torch.equal(a[k], b[k]) for k in b), "resumed weights differ from the uninterrupted run"
    losses_ref = [
        json.loads(x)["loss"]
        for x in (ref_out / "phases" / phase.name / "metrics.jsonl").read_text().splitlines()
    ]
    losses_res = [
        json.loads(x)["loss"]
        for x in (work / "phases" / phase.name / "metrics.jsonl").read_text().splitlines()
    ]
    # the interrupted run logged steps 1..6, then resumed from its step-4 checkpoint and logged 5..end
    assert losses_res[:6] == losses_ref[:6]
    assert losses_res[6:] == losses_ref[4:]


def parents_linked(work, ref_out, phase):
    """A run directory whose phases before ``phase`` are the reference run's (symlinked)."""
    (work / "phases").mkdir(parents=True)
    for prev in RECIPE.phases[: list(RECIPE.phases).index(phase)]:
        os.symlink(ref_out / "phases" / prev.name, work / "phases" / prev.name)
    return work


def test_data_workers_train_the_identical_trajectory_and_resume_with_another_count(
    tiny_data, tiny_run, tmp_path, monkeypatch
):
    """joint_pretrain (images, video) with 2 DataLoader workers reading ahead, interrupted after 6 steps and
    resumed with 1 worker: the tokens, the final loss and the final weights are those of the in-process
    run (0 workers). The rank's compute threads are held at the reference run's count (workers would
    otherwise take cores from it, tasks/train/threads.py, and another thread count sums floats in another
    order)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    data_root, ref_out, results = tiny_run
    phase = RECIPE.phase("joint_pretrain")
    work = parents_linked(tmp_path / "workers", ref_out, phase)
    two, one = short_recipe(data_workers=2, data_prefetch=3), short_recipe(data_workers=1)
    part = run_phase(two, phase, data_root, work, log=lambda *_: None, stop_after_steps=6)
    assert part["interrupted_at_step"] == 6
    resumed = run_phase(one, phase, data_root, work, log=lambda *_: None)
    ref = results["joint_pretrain"]
    for k in ("tokens", "tokens_by_source", "steps", "final_loss"):
        assert resumed[k] == ref[k], k
    a = load_safetensors(final_dir(work, phase) / "model.safetensors")
    b = _weights(ref_out, "joint_pretrain")
    assert all(torch.equal(a[k], b[k]) for k in b), "weights differ from the run without workers"


def test_resume_from_a_checkpoint_without_per_source_counts_omits_them(
    tiny_data, tiny_run, tmp_path, monkeypatch
):
    """A checkpoint written before per-source accounting existed: the phase finishes with the same tokens
    but reports no (partial) per-source counts, and says so."""
    from tasks.train.engine import TrainEngine

    data_root, ref_out, results = tiny_run
    phase = RECIPE.phase("joint_pretrain")
    work = parents_linked(tmp_path / "old", ref_out, phase)
    save = TrainEngine.save_checkpoint

    def old_save(self, directory, extra_state=None):
        return save(
            self, directory, {k: v for k, v in (extra_state or {}).items() if k != "tokens_by_source"}
        )

    monkeypatch.setattr(TrainEngine, "save_checkpoint", old_save)
    run_phase(RECIPE, phase, data_root, work, log=lambda *_: None, stop_after_steps=6)
    monkeypatch.setattr(TrainEngine, "save_checkpoint", save)
    said: list[str] = []
    resumed = run_phase(RECIPE, phase, data_root, work, log=said.append)
    assert resumed["tokens"] == results["joint_pretrain"]["tokens"]
    assert "tokens_by_source" not in resumed and "tokens_by_group" not in resumed
    assert any("predates per-source token accounting" in m for m in said), said


def test_missing_parent_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    data_root, _ = tiny_data
    with pytest.raises(MissingParentError, match="starts from phase 'vit'.*run 'vit' first"):
        run_phase(RECIPE, RECIPE.phase("align"), data_root, tmp_path, log=lambda *_: None)


def test_second_trainer_of_a_phase_stops_before_any_work(tiny_data, tmp_path):
    """A phase already being trained into this run directory (its lock held): a second run_phase stops
    with PhaseBusyError naming the holder, and writes nothing."""
    from tasks.train.phase_lock import PhaseBusyError, phase_lock

    recipe = short_recipe()
    pdir = tmp_path / "phases" / "text_pretrain"
    with phase_lock(pdir), pytest.raises(PhaseBusyError, match=f"being trained by pid {os.getpid()}"):
        run_phase(recipe, recipe.phase("text_pretrain"), tiny_data[0], tmp_path, log=lambda *_: None)
    assert [p.name for p in pdir.iterdir()] == [".lock"]


@pytest.mark.integration
def test_two_process_stage_matches_one_process(tiny_data, tiny_run, tmp_path):
    """`kimivl stage text_pretrain --nproc 2` (torchrun, gloo) == 1 process at equal global batch."""
    data_root, _ = tiny_data
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    recipe = short_recipe().model_dump(mode="json", by_alias=True)
    for p in recipe["phases"]:
        p["micro_batches_per_step"] = 2
        p["token_budget"] = 4096
    recipe["name"] = raw["name"]
    rpath = tmp_path / "recipe.yaml"
    rpath.write_text(yaml.safe_dump(recipe))
    dist_env = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}  # set by in-process engines
    env = {k: v for k, v in os.environ.items() if k not in dist_env} | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        cmd = [sys.executable, "-m", "flows.cli", "stage", "text_pretrain", "--recipe", str(rpath),
               "--data", str(data_root), "--out", str(out), "--nproc", str(nproc)]  # fmt: skip
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        metrics = [
            json.loads(x)
            for x in (out / "phases" / "text_pretrain" / "metrics.jsonl").read_text().splitlines()
        ]
        runs[nproc] = (
            [m["loss"] for m in metrics],
            load_safetensors(out / "phases" / "text_pretrain" / "final" / "model.safetensors"),
        )
    (l1, w1), (l2, w2) = runs[1], runs[2]
    assert len(l1) == len(l2) >= 3
    for a, b in zip(l1, l2, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (l1, l2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    # the complete phase again: up to date; with --rerun it trains again, its old directory kept aside
    out = tmp_path / "out1"
    base = [sys.executable, "-m", "flows.cli", "stage", "text_pretrain", "--recipe", str(rpath),
            "--data", str(data_root), "--out", str(out)]  # fmt: skip
    again = subprocess.run(base, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "[text_pretrain] already complete" in again.stderr, again.stderr[-3000:]
    rerun = subprocess.run([*base, "--rerun"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (aside,) = (out / "phases").glob(".text_pretrain.replaced-*")
    assert f"[text_pretrain] rerun: the previous run directory is now {aside}" in rerun.stderr
    assert load_safetensors(aside / "final" / "model.safetensors").keys() == w1.keys()
    w1_again = load_safetensors(out / "phases" / "text_pretrain" / "final" / "model.safetensors")
    for k in w1:  # the same training from the same start
        torch.testing.assert_close(w1_again[k], w1[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "a3b_memory",
    [False, True],
    ids=["bf16-working-weights", "plus-frozen-bf16-and-sharded-gradients"],
)
def test_recipe_phases_run_with_bf16_working_weights(tiny_data, tmp_path, a3b_memory):
    """``train.working_weights: bf16`` through the stage runner (CPU bf16 autocast): text pretraining, the CoCa
    ViT phase, alignment (frozen LM) and joint pretraining run to completion (3 non-finite steps in a row
    would stop them: DivergenceError); every export is fp32 (the masters), the LM weights frozen in
    alignment leave it bit-identical to what it was given, and joint pretraining moves them. The second
    case adds a3b's other memory settings: frozen weights held in bf16 (saved from the phase's starting
    checkpoint) and gradients sharded to their owners."""
    data_root, _ = tiny_data
    extra = {"frozen_weights": "bf16", "shard_gradients": True} if a3b_memory else {}
    recipe = short_recipe(precision="bf16", working_weights="bf16", **extra)
    logs: dict[str, list] = {}
    for name in ("text_pretrain", "vit", "align", "joint_pretrain"):
        logs[name] = []
        result = run_phase(recipe, recipe.phase(name), data_root, tmp_path, log=logs[name].append)
        assert result is not None
    exports = {n: _weights(tmp_path, n) for n in ("vit", "align", "joint_pretrain")}
    for name, w in exports.items():
        assert {t.dtype for t in w.values()} == {torch.float32}, name
    frozen = [k for k in exports["align"] if k.startswith("language_model.")]
    assert frozen and all(
        torch.equal(exports["align"][k], exports["vit"][k]) for k in frozen if k in exports["vit"]
    )
    moved = [
        k
        for k in exports["joint_pretrain"]
        if not torch.equal(exports["joint_pretrain"][k], exports["align"][k])
    ]
    assert any(k.startswith("language_model.") for k in moved)
