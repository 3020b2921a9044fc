"""The model-state memory plan (``tasks/train/memory.py``) against what the engine really allocates, the
pre-build refusal of a phase that cannot fit, and ``kimivl recipe memory`` on the full-scale recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kimivl_model.vlm import KimiVL
from tasks.recipe import recipe_from_dict
from tasks.train import memory
from tasks.train.engine import TrainEngine
from tasks.train.engine_config import EngineConfig
from tasks.train.runner import coca_loss, lm_loss, phase_dir, run_phase
from tasks.train.schedule import LRScheduleConfig
from tests.integration._engine_common import _one_thread_and_clean_process_group  # noqa: F401  (autouse)

ROOT = Path(__file__).resolve().parents[2]


def _tiny(optimizer: str = "muon", zero_stage: int = 0):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(optimizer=optimizer, zero_stage=zero_stage)
    return recipe_from_dict(raw, "params.yaml")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(
    ("optimizer", "phase_name"),
    [("muon", "joint_pretrain"), ("muon", "align"), ("muon", "vit"), ("adamw", "sft.1")],
)
def test_plan_is_what_the_engine_allocates(optimizer, phase_name):
    """Weights, gradients and optimizer state the engine holds after a step == the plan, byte for byte."""
    recipe = _tiny(optimizer)
    phase = recipe.phase(phase_name)
    plan = memory.plan_phase(recipe, phase, world=1, device_type="cpu")
    torch.manual_seed(0)
    model = KimiVL(recipe.model.vlm_config(), with_coca=phase.objective == "coca")
    model.set_trainable(list(phase.trainable))
    schedule = LRScheduleConfig(peak_lr=1e-3, min_lr=1e-4, warmup_steps=1, total_steps=4)
    cfg = EngineConfig(optimizer=optimizer, zero_stage=0, precision="fp32", schedule=schedule)
    eng = TrainEngine(model, cfg, coca_loss if phase.objective == "coca" else lm_loss)
    for p in eng.trainable:
        p.grad = torch.full_like(p, 1e-3)
    eng.optimizer.step()  # the optimizer creates its state on the first step
    params = {id(p): p for p in model.parameters()}.values()
    state = [
        t for s in eng.optimizer.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "step"
    ]
    assert plan.params == sum(p.numel() for p in params) and plan.trainable == sum(
        p.numel() for p in eng.trainable
    )
    assert plan.weights == _bytes(params)
    assert plan.gradients == _bytes(p.grad for p in params if p.grad is not None)
    assert plan.optimizer_state == _bytes(state) > 0
    assert plan.autocast_copies == 0 and plan.precision == "fp32"
    if phase_name == "align":  # ViT + projector train; the LM's weights are held, not its gradients
        assert plan.trainable < plan.params / 2 and plan.gradients < plan.weights / 2


def test_plan_over_ranks_and_precision():
    recipe = _tiny()
    phase = recipe.phase("joint_pretrain")
    one, four = (memory.plan_phase(recipe, phase, w, "cpu") for w in (1, 4))
    # weights and gradients are whole on every rank (ZeRO 0); Muon state is split by whole-matrix owners
    assert (four.weights, four.gradients) == (one.weights, one.gradients)
    assert one.optimizer_state / 4 <= four.optimizer_state < one.optimizer_state
    gpu = memory.plan_phase(recipe, phase, 1, "cuda")  # precision auto: bf16 autocast on CUDA
    assert gpu.precision == "bf16" and gpu.autocast_copies == 2 * gpu.trainable
    z2 = memory.plan_phase(_tiny("adamw", 2), phase, 4, "cpu")
    assert z2.gradients == one.gradients // 4 and z2.optimizer_state == 3 * -(-one.trainable // 4) * 4


def test_a_phase_that_cannot_fit_stops_before_the_model_is_built(monkeypatch, tmp_path):
    recipe = _tiny()
    phase = recipe.phase("text_pretrain")
    monkeypatch.setattr(memory, "device_memory", lambda device, local=1: (1 << 20, "a 1 MiB test device", 1))
    built = []
    monkeypatch.setattr("tasks.train.runner.build_model", lambda *a: built.append(a))
    with pytest.raises(
        memory.MemoryPlanError, match=r"'text_pretrain'.*a 1 MiB test device.*kimivl recipe memory"
    ):
        run_phase(recipe, phase, tmp_path / "data", tmp_path / "out", log=lambda *_: None)
    assert built == [] and not (phase_dir(tmp_path / "out", phase) / "checkpoints").exists()
    # CPU ranks on one host share its RAM
    plan = memory.plan_phase(recipe, phase, 2, "cpu")
    memory.check_fits(plan, plan.total * 2, "host", ranks_sharing=2)
    with pytest.raises(memory.MemoryPlanError, match=r"2 ranks x"):
        memory.check_fits(plan, plan.total * 2 - 1, "host", ranks_sharing=2)


def test_recipe_memory_cli_on_the_full_scale_recipe(tmp_path):
    """configs/a3b.yaml on 8 ranks of 80 GB GPUs (79.1 GiB). As shipped (bf16 working weights, gradients
    sharded to their Muon owners, experts split over the 8 ranks, gradient checkpointing, the 128K phases'
    sequences split over 4 ranks), the 8K phases fit with >= 10% headroom, states + activations, and the 32K
    and 128K ones fit too (on 64 ranks with >= 10% headroom; without sequence parallelism the 128K ones do not); without expert parallelism only the
    8K ones fit; without sharded gradients they need ~80 GiB of model states alone; with fp32 working weights
    > 150 GiB (fp32 weights + gradients on every rank)."""
    from flows.cli import app

    def memory(recipe: Path, gib: str, world: int = 8):
        args = ["recipe", "memory", "-r", str(recipe), "--world", str(world), "--device-memory", gib]
        res = CliRunner().invoke(app, args, env={"COLUMNS": "120"})
        out = json.loads(res.stdout.strip().splitlines()[-1])
        return res, {p["phase"]: p for p in out["phases"]}

    def variant(name: str, **train) -> Path:
        raw = yaml.safe_load((ROOT / "configs/a3b.yaml").read_text())
        raw["train"].update(train)
        path = tmp_path / f"a3b-{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    gib = 1024**3
    eight_k = ("vit", "align", "joint_pretrain", "cooldown")  # every 8K phase: >= 10% headroom on 80 GB
    res, phases = memory(ROOT / "configs/a3b.yaml", "79.1")
    jp = phases["joint_pretrain"]
    assert jp["params"] == jp["trainable"] == 16_407_654_384 and jp["expert_parallel"] == 8
    low = jp["bf16_working_params"]
    assert 0.95 * jp["params"] < low < jp["params"]  # all matmul weights; embeddings, norms, router fp32
    experts = 26 * 3 * 64 * 2048 * 1408  # 26 MoE layers x 3 projections x 64 experts: 7/8 of them elsewhere
    assert jp["weights"] == 2 * (low - experts * 7 // 8) + 4 * (jp["params"] - low)
    # activations of one worst-case micro-batch (8K tokens, all-image: 32K patches; checkpointing on)
    acts = jp["activation_parts"]
    assert (acts["tokens"], acts["patches"], acts["checkpointing"]) == (8192, 32768, True)
    assert jp["total"] == jp["states"] + jp["activations"] and 5 * gib < jp["activations"] < 20 * gib
    for name in eight_k:
        assert phases[name]["total"] <= 0.9 * 79.1 * gib, (name, phases[name]["total"] / gib)
    # the CoCa micro-batch: 16 images of up to 4,096 patches per rank (negatives from every rank)
    assert phases["vit"]["activation_parts"]["patches"] == 16 * 4096
    # the 128K phases split each sequence over 4 ranks: 32K tokens' activations per rank (+ 2 cut images)
    assert res.exit_code == 0, res.output
    assert all(p["fits"] for p in phases.values())
    for name in ("long_context.2", "sft.2"):
        acts = phases[name]["activation_parts"]
        assert phases[name]["sequence_parallel"] == 4 and acts["tokens"] == 131072 // 4
        assert acts["patches"] == 4 * 32768 + 2 * 4096

    # 64 ranks (8 nodes): the long phases at their recipe's SP degree with >= 10% headroom; without SP the
    # 128K phases need ~160 GiB per rank
    res64, phases64 = memory(ROOT / "configs/a3b.yaml", "79.1", world=64)
    assert res64.exit_code == 0, res64.output
    for name in ("long_context.1", "long_context.2", "sft.1", "sft.2"):
        assert phases64[name]["total"] <= 0.9 * 79.1 * gib, (name, phases64[name]["total"] / gib)
    raw = yaml.safe_load((ROOT / "configs/a3b.yaml").read_text())
    for ph in raw["phases"]:
        ph.pop("sequence_parallel", None)
    (tmp_path / "a3b-nosp.yaml").write_text(yaml.safe_dump(raw))
    res, nosp = memory(tmp_path / "a3b-nosp.yaml", "79.1", world=64)
    assert res.exit_code == 1 and {n for n, p in nosp.items() if not p["fits"]} == {"long_context.2", "sft.2"}
    assert all(nosp[n]["total"] > 150 * gib for n in ("long_context.2", "sft.2"))

    res, phases = memory(variant("no-ep", expert_parallel=1), "79.1")
    jp = phases["joint_pretrain"]
    assert jp["weights"] == 2 * low + 4 * (jp["params"] - low)
    # sharded: fp32 main gradients of ~1/8 of the parameters (whole matrices) + two buckets in flight
    assert 4 * jp["params"] / 8 < jp["gradients"] < 4 * jp["params"] / 8 * 1.4
    for name in eight_k:
        assert phases[name]["total"] <= 0.9 * 79.1 * gib, (name, phases[name]["total"] / gib)
    assert {n for n, p in phases.items() if p["fits"]} == set(eight_k)

    res, phases = memory(variant("whole-grads", shard_gradients=False, expert_parallel=1), "79.1")
    jp = phases["joint_pretrain"]
    assert jp["weights"] == jp["gradients"] == 2 * low + 4 * (jp["params"] - low)
    assert 75 * gib < jp["states"] < 85 * gib and not jp["fits"]

    res, phases = memory(
        variant("fp32", working_weights="fp32", shard_gradients=False, expert_parallel=1), "79.1"
    )
    assert res.exit_code == 1, res.output
    assert phases["align"]["fits"]
    jp = phases["joint_pretrain"]
    assert jp["weights"] == jp["gradients"] == 4 * jp["params"] and jp["total"] > 150 * gib
    assert not jp["fits"] and jp["bf16_working_params"] == 0
    assert "does not fit 79.1 GiB" in res.output and "joint_pretrain" in res.output


def plan_and_model(phase_name: str, **train) -> tuple[memory.MemoryPlan, KimiVL, EngineConfig]:
    """The tiny recipe's phase under bf16 autocast with ``train`` settings: its plan on 1 CPU rank, the
    phase's model (seeded, trainable set applied) and the engine config to build it with."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(precision="bf16", **train)
    recipe = recipe_from_dict(raw, "params.yaml")
    phase = recipe.phase(phase_name)
    plan = memory.plan_phase(recipe, phase, world=1, device_type="cpu")
    torch.manual_seed(0)
    model = KimiVL(recipe.model.vlm_config())
    model.set_trainable(list(phase.trainable))
    schedule = LRScheduleConfig(peak_lr=1e-3, min_lr=1e-4, warmup_steps=1, total_steps=4)
    return plan, model, EngineConfig(optimizer="muon", precision="bf16", schedule=schedule, **train)


def test_plan_with_bf16_working_weights_is_what_the_engine_allocates():
    """working_weights bf16 on CPU (bf16 autocast): bf16 matmul weights and gradients, fp32 rest, fp32
    masters + momentum as optimizer state: the plan byte for byte."""
    plan, model, cfg = plan_and_model("joint_pretrain", working_weights="bf16")
    eng = TrainEngine(model, cfg, lm_loss)
    for p in eng.trainable:
        p.grad = torch.full_like(p, 1e-3)
    eng.optimizer.step()
    params = list({id(p): p for p in model.parameters()}.values())
    state = [
        t for s in eng.optimizer.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "step"
    ]
    assert plan.bf16_working_params == eng.low_precision_params > 0.5 * plan.trainable
    assert plan.bf16_working_params == sum(p.numel() for p in params if p.dtype == torch.bfloat16)
    assert plan.weights == _bytes(params)
    assert plan.gradients == _bytes(p.grad for p in params if p.grad is not None)
    assert plan.optimizer_state == _bytes(state)
    assert plan.autocast_copies == 2 * (plan.trainable - plan.bf16_working_params)


def test_plan_uses_the_init_checkpoints_architecture(tmp_path):
    """An imported model (model.init_checkpoint) is planned with its own config, as build_model loads it."""
    import dataclasses

    from kimivl_model.config import preset
    from tasks.io.weights import NATIVE_CONFIG

    cfg = preset("tiny")
    wide = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=cfg.lm.vocab_size * 2))
    (tmp_path / NATIVE_CONFIG).write_text(json.dumps(wide.to_dict()))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["init_checkpoint"] = str(tmp_path)
    phase = _tiny().phase("text_pretrain")
    base = memory.plan_phase(_tiny(), phase, 1, "cpu")
    imported = memory.plan_phase(recipe_from_dict(raw, "r.yaml"), phase, 1, "cpu")
    added_rows = cfg.lm.vocab_size * cfg.lm.hidden_size  # per vocabulary matrix: embedding, output head
    assert imported.params - base.params == added_rows * (1 if cfg.lm.tie_word_embeddings else 2)


def test_a_launch_whose_ranks_cannot_share_the_host_is_refused_before_it_starts(monkeypatch, tmp_path):
    """`kimivl stage --nproc 2` (and the flows' launch parameter) on CPU: the two ranks' model states
    together must fit this host's RAM; checked in the parent, one exit-2 message, nothing launched."""
    import subprocess

    from flows.cli import app
    from flows.launch_settings import LaunchSettings

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for p in raw["phases"]:
        p["micro_batches_per_step"] = 2
    (tmp_path / "dp2.yaml").write_text(yaml.safe_dump(raw))
    recipe = recipe_from_dict(raw, "dp2.yaml")
    need = memory.plan_phase(recipe, recipe.phase("sft.1"), 2, "cpu").total
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(
        memory, "device_memory", lambda device, local=1: (2 * need - 1, "a small host", local)
    )
    with pytest.raises(memory.MemoryPlanError, match=r"'sft.1'.*\(2 ranks x .* a small host"):
        LaunchSettings(nproc=2).check(recipe, [recipe.phase("sft.1")])
    LaunchSettings(nproc=1).check(recipe, [recipe.phase("sft.1")])  # in-process: the runner checks
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: launched.append(cmd) or 0)
    (tmp_path / "data" / "tokenized").mkdir(parents=True)
    args = [
        "stage",
        "sft.1",
        "--nproc",
        "2",
        "-r",
        str(tmp_path / "dp2.yaml"),
        "--data",
        str(tmp_path / "data"),
    ]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")], env={"COLUMNS": "300"})
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "dp2.yaml: phase 'sft.1': its model states and activations need" in text, (
        text
    )
    assert launched == [] and not (tmp_path / "o").exists()


def test_plan_with_sharded_gradients_is_what_the_engine_keeps():
    """train.shard_gradients: after the backward's reduce, the fp32 main gradients the owner keeps are the
    plan's gradient figure less its in-flight allowance (two buckets or the largest matrix); over 4 ranks
    the busiest owner keeps about a quarter."""
    from tasks.train.distributed_muon import GRAD_BUCKET_BYTES, assign_owners

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(shard_gradients=True)
    recipe = recipe_from_dict(raw, "params.yaml")
    phase = recipe.phase("joint_pretrain")
    plan = memory.plan_phase(recipe, phase, world=1, device_type="cpu")
    torch.manual_seed(0)
    model = KimiVL(recipe.model.vlm_config())
    model.set_trainable(list(phase.trainable))
    schedule = LRScheduleConfig(peak_lr=1e-3, min_lr=1e-4, warmup_steps=1, total_steps=4)
    cfg = EngineConfig(optimizer="muon", precision="fp32", schedule=schedule, shard_gradients=True)
    eng = TrainEngine(model, cfg, lm_loss)
    for p in eng.trainable:
        p.grad = torch.full_like(p, 1e-3)
    eng._muon.finish_backward()  # what runs after every micro-batch's backward
    assert all(p.grad is None for p in eng.trainable)
    kept = _bytes(eng._muon._main.values())
    largest = max(p.numel() for p in eng.trainable) * 4
    assert kept == 4 * plan.trainable == plan.gradients - 2 * max(GRAD_BUCKET_BYTES, largest)
    four = memory.plan_phase(recipe, phase, world=4, device_type="cpu")
    numels = [[p.numel() for p in g["params"]] for g in eng.optimizer.param_groups]
    owners = assign_owners(numels, 4)
    busiest = max(
        sum(n for g, ns in enumerate(numels) for i, n in enumerate(ns) if owners[g][i] == r) for r in range(4)
    )
    assert four.gradients == 4 * busiest + 2 * max(GRAD_BUCKET_BYTES, largest)
    assert plan.trainable / 4 <= busiest < plan.trainable / 2


def _ep_recipe():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(shard_gradients=True, expert_parallel=2)
    return recipe_from_dict(raw, "params.yaml")


def _ep_rank_states(rank: int, out: Path) -> None:
    """One rank of an EP-2 engine on the tiny joint_pretrain phase: what it holds after a step, as JSON."""
    recipe = _ep_recipe()
    phase = recipe.phase("joint_pretrain")
    torch.manual_seed(0)
    model = KimiVL(recipe.model.vlm_config())
    model.set_trainable(list(phase.trainable))
    schedule = LRScheduleConfig(peak_lr=1e-3, min_lr=1e-4, warmup_steps=1, total_steps=4)
    cfg = EngineConfig(
        optimizer="muon",
        precision="fp32",
        schedule=schedule,
        shard_gradients=True,
        expert_parallel=2,
        micro_batches_per_step=2,
    )
    eng = TrainEngine(model, cfg, lm_loss)
    for p in eng.trainable:
        p.grad = torch.full_like(p, 1e-3)
    eng._muon._had_grad = {id(p) for p in eng.trainable}  # what the backward's hooks record
    eng._muon.finish_backward()
    grads = _bytes(eng._muon._main.values())
    eng.optimizer.step()
    params = {id(p): p for p in model.parameters()}.values()
    state = [
        t for s in eng.optimizer.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "step"
    ]
    found = {"weights": _bytes(params), "grads": grads, "optimizer": _bytes(state)}
    (out / f"states{rank}.json").write_text(json.dumps(found))


def test_plan_with_expert_parallel_is_what_each_rank_keeps(tmp_path):
    """train.expert_parallel 2 on 2 gloo ranks: each rank's weights, fp32 main gradients and optimizer state
    after a step; the plan's figures are the busiest rank's (gradients: plus its in-flight allowance)."""
    from tasks.train.distributed_muon import GRAD_BUCKET_BYTES
    from tests.gloo_ranks import run_ranks

    recipe = _ep_recipe()
    phase = recipe.phase("joint_pretrain")
    run_ranks(_ep_rank_states, tmp_path, world=2, timeout=600)
    ranks = [json.loads((tmp_path / f"states{r}.json").read_text()) for r in range(2)]
    plan = memory.plan_phase(recipe, phase, world=2, device_type="cpu")
    assert plan.expert_parallel == 2
    assert ranks[0]["weights"] == ranks[1]["weights"] == plan.weights
    # the tiny model's matrices are all smaller than a bucket: the in-flight allowance is two buckets
    assert plan.gradients == max(r["grads"] for r in ranks) + 2 * GRAD_BUCKET_BYTES
    assert min(r["grads"] for r in ranks) > 0
    assert plan.optimizer_state == max(r["optimizer"] for r in ranks)
    # EP 2 holds half of every expert stack: less than the same 2 ranks without EP
    no_ep = memory.plan_phase(_tiny(), phase, world=2, device_type="cpu")
    assert plan.weights < no_ep.weights
