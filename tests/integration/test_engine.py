"""TrainEngine (DeepSpeed, CPU gloo): config validation, launch commands, exact token-weighted steps, frozen
parameters, bf16 autocast, NaN guard.

Checkpoints, resume and the multi-process runs (SIGKILL + resume, torchrun with 2 ranks) are tested in
``test_engine_checkpoints.py``. The tiny model, the deterministic batches and the loss live in
``_engine_worker.py`` so the in-process runs and the subprocess runs train exactly the same thing; the
one-thread fixture and the state comparison are shared through ``_engine_common.py``. Every process uses ONE
torch thread, so in-process and subprocess runs are bit-comparable.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from kimivl_model.lm import KimiLM
from kimivl_model.muon import Muon, build_param_groups
from tasks.io.weights import load_safetensors
from tasks.tracking.local import MemoryTracker
from tasks.train import checkpoint as ckpt
from tasks.train.checkpoint import DivergenceError, checkpoint_path
from tasks.train.engine import EngineConfig, LossResult, TrainEngine, build_ds_config
from tasks.train.launch import build_launch_command, launch_world_size
from tasks.train.schedule import lr_at
from tests.integration._engine_common import (
    _assert_equal_state,
    _one_thread_and_clean_process_group,  # noqa: F401  (autouse)
)
from tests.integration._engine_worker import VOCAB, engine_config, global_batch, loss_fn, make_model, train
from tests.integration.conftest import ROOT


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------- config (fast)
def test_engine_config_validation_names_the_field():
    with pytest.raises(ValidationError, match="zero_stage") as e:
        EngineConfig(optimizer="muon", zero_stage=2)
    assert "flattens" in str(e.value)
    EngineConfig(optimizer="adamw", zero_stage=2)
    with pytest.raises(ValidationError, match="zero_stage"):
        EngineConfig(optimizer="adamw", zero_stage=3)
    with pytest.raises(ValueError, match="micro_batches_per_step"):
        EngineConfig(micro_batches_per_step=6).check_world_size(4)
    assert EngineConfig(micro_batches_per_step=8).check_world_size(4) == 2
    with pytest.raises(ValidationError, match="peak_lr"):
        EngineConfig(schedule={"peak_lr": -1e-3, "min_lr": 0.0})
    for kw, field in (
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"adamw_betas": (0.9, 1.5)}, "adamw_betas"),
        ({"optimzer": "muon"}, "optimzer"),
        ({"max_consecutive_nonfinite": 0}, "max_consecutive"),
    ):
        with pytest.raises(ValidationError, match=field):
            EngineConfig(**kw)


def test_ds_config_from_engine_config():
    cfg = EngineConfig(
        optimizer="adamw", zero_stage=2, micro_batches_per_step=8, grad_clip=0.5, precision="bf16"
    )
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2} and "scheduler" not in ds
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"]
    muon = build_ds_config(EngineConfig(optimizer="muon", precision="auto"), world_size=1, device_type="cpu")
    assert "optimizer" not in muon and not muon["torch_autocast"]["enabled"]  # auto: fp32 on CPU
    assert EngineConfig(precision="auto").resolved_precision("cuda") == "bf16"


def test_launch_commands(tmp_path):
    cmd = build_launch_command(
        ["train.py", "--x", "1"],
        2,
        "torchrun",
        master_port=1234,
        nnodes=2,
        node_rank=1,
        master_addr="10.0.0.1",
    )
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-3:] == ["train.py", "--x", "1"]
    for flag, val in (
        ("--nproc_per_node", "2"),
        ("--nnodes", "2"),
        ("--node_rank", "1"),
        ("--master_addr", "10.0.0.1"),
        ("--master_port", "1234"),
    ):
        assert cmd[cmd.index(flag) + 1] == val
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    ds = build_launch_command(["train.py"], 2, "deepspeed", hostfile=hostfile, master_port=29500)
    assert ds[1:3] == ["-m", "deepspeed.launcher.runner"] and ds[ds.index("--hostfile") + 1] == str(hostfile)
    with pytest.raises(ValueError, match="hostfile"):
        build_launch_command(["train.py"], 2, "torchrun", hostfile=hostfile)
    with pytest.raises(ValueError, match="master_addr"):
        build_launch_command(["train.py"], 2, "torchrun", nnodes=2, node_rank=0)
    with pytest.raises(ValueError, match="launcher"):
        build_launch_command(["train.py"], 2, "mpirun")
    # ranks a launch starts: --num_gpus N on every host of the hostfile (DeepSpeed's own parser)
    assert launch_world_size(3) == 3 and launch_world_size(2, hostfile) == 4
    hostfile.write_text("# cluster\nnode-a slots=8\n\nnode-b slots=8\nnode-c slots=8\n")
    assert launch_world_size(2, hostfile) == 6
    hostfile.write_text("node-a slotz=2\n")
    with pytest.raises(ValueError, match="bad entry.*host slots=N"):
        launch_world_size(2, hostfile)
    with pytest.raises(FileNotFoundError, match="host slots=N"):
        launch_world_size(2, tmp_path / "nope")


def test_multi_process_launch_is_checked_before_any_process_starts(tmp_path, monkeypatch):
    """`--nproc N` checks the recipe, the data and each phase's batch split over the world size in the
    parent: a phase whose micro_batches_per_step the world size does not divide is one exit-2 message naming
    the field, and nothing is launched."""
    import subprocess

    from typer.testing import CliRunner

    from flows.cli import app

    launched = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: launched.append(cmd) or 0)
    (tmp_path / "data" / "tokenized").mkdir(parents=True)
    env = {"COLUMNS": "500", "NO_COLOR": "1"}

    def stage(*args):
        res = CliRunner().invoke(
            app, ["stage", *args, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")], env=env
        )
        return res, " ".join(res.output.split())

    tiny = str(ROOT / "params.yaml")
    res, text = stage("joint_pretrain", "--nproc", "2", "--recipe", tiny)  # tiny: 1 micro-batch per step
    assert res.exit_code == 2, text
    assert "params.yaml: field phases.3.micro_batches_per_step" in text and "multiple of 2" in text, text
    res, text = stage("joint_pretrain", "--nproc", "2", "--recipe", str(tmp_path / "missing.yaml"))
    assert res.exit_code == 2 and "missing.yaml" in text, text
    (tmp_path / "hf").write_text("node-a slots=2\nnode-a slots=2\n")
    res, text = stage(
        "joint_pretrain", "--launcher", "deepspeed", "--hostfile", str(tmp_path / "hf"), "-r", tiny
    )
    assert res.exit_code == 2 and "--hostfile" in text and "multiple entries" in text, text
    # the main job takes the same settings for its training tasks, and checks them before any work
    res = CliRunner().invoke(app, ["run", "-r", tiny, "--out", str(tmp_path / "o"), "--nproc", "2"], env=env)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "phases.0.micro_batches_per_step" in text and "multiple of 2" in text, text
    args = ["run", "-r", tiny, "--out", str(tmp_path / "o"), "--launcher", "deepspeed", "--hostfile"]
    res = CliRunner().invoke(app, [*args, str(tmp_path / "hf")], env=env)  # the same check and wording
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "error: --hostfile:" in text and "multiple entries" in text, text
    assert launched == [] and not (tmp_path / "o").exists()

    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["phases"][3]["micro_batches_per_step"] = 2
    (tmp_path / "dp2.yaml").write_text(yaml.safe_dump(raw))
    res, text = stage("joint_pretrain", "--nproc", "2", "--recipe", str(tmp_path / "dp2.yaml"))
    assert res.exit_code == 0 and len(launched) == 1, text  # divisible: launched (the call is stubbed)
    cmd = launched[0]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[-1] == "--worker"


# ----------------------------------------------------------------------------------- training
@pytest.mark.integration
@pytest.mark.parametrize(("opt", "zero"), [("muon", 0), ("adamw", 1), ("adamw", 2)])
def test_loss_falls(opt, zero):
    model, tracker = make_model(), MemoryTracker()
    cfg = engine_config(opt, zero, m=2)
    eng = TrainEngine(model, cfg, loss_fn, tracker=tracker)
    losses = [x["loss"] for x in train(eng, model, 0, 20)]
    assert [v for _, v in tracker.series("lr")] == [lr_at(cfg.schedule, s) for s in range(20)]
    assert {g["lr"] for g in eng.optimizer.param_groups} == {lr_at(cfg.schedule, 19)}
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    assert tracker.params["engine.zero_stage"] == zero and len(tracker.series("loss")) == 20
    if opt == "muon":  # REFERENCE.md: check how many params Muon actually gets
        assert tracker.params["optimizer.muon_params"] > 0.5 * tracker.params["trainable_params"]


def _reference_run(opt: str, cfg, steps: int) -> tuple[KimiLM, list[dict], dict]:
    """Plain torch loop: per step, d/dθ [sum of CE over all target tokens / N + mean of aux over the
    micro-batches] in ONE backward, torch's clip_grad_norm_, the optimizer at lr_at(step), router bias."""
    model = make_model()
    if opt == "muon":
        ref_opt = Muon(build_param_groups(model, lr=1.0, weight_decay=0.1))
    else:
        ref_opt = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    steps_out, grads0 = [], {}
    for s in range(steps):
        mbs = global_batch(s)
        outs = [
            model(mb["input_ids"], cu_seqlens=mb["cu_seqlens"], labels=mb["labels"], return_logits=False)
            for mb in mbs
        ]
        n = sum(int(o.num_loss_tokens) for o in outs)
        ce = sum(o.loss_sum for o in outs)
        ref_opt.zero_grad(set_to_none=True)
        (ce / n + sum(o.aux_loss for o in outs) / len(mbs)).backward()
        if s == 0:
            grads0 = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for g in ref_opt.param_groups:
            g["lr"] = lr_at(cfg.schedule, s)
        ref_opt.step()
        model.update_router_bias(sum(o.expert_load for o in outs))
        steps_out.append({"loss": float(ce.detach()) / n, "tokens": n, "grad_norm": float(norm)})
    return model, steps_out, grads0


@pytest.mark.integration
@pytest.mark.parametrize(("opt", "zero"), [("muon", 0), ("adamw", 0), ("adamw", 2)])
def test_gradient_accumulation_is_exact(opt, zero):
    """3 steps over 4 micro-batches each == a plain torch loop on the token-weighted whole-batch gradient
    (same optimizer, clipping at 0.5 active, LR schedule, router bias updates)."""
    model, grads = make_model(), {}

    def grab(engine):
        if engine.step == 0:
            grads.update(
                {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}
            )

    cfg = engine_config(opt, zero, grad_clip=0.5)
    eng = TrainEngine(model, cfg, loss_fn, before_step=grab)
    got = []
    for s in range(3):
        r = eng.train_step(global_batch(s))
        model.update_router_bias(r.expert_load)
        got.append(r)
    ref_model, ref, ref_grads = _reference_run(opt, cfg, 3)
    assert [r.tokens for r in got] == [x["tokens"] for x in ref]
    assert [r.loss for r in got] == pytest.approx([x["loss"] for x in ref], rel=1e-6)
    # the pre-clip norm catches any missing or double scaling (Muon and Adam are ~scale-invariant)
    assert [r.grad_norm for r in got] == pytest.approx([x["grad_norm"] for x in ref], rel=1e-5)
    assert all(x["grad_norm"] > 0.5 for x in ref)  # clipping was active
    if zero == 0:  # ZeRO 1/2 keep their gradients partitioned inside DeepSpeed
        assert grads.keys() == ref_grads.keys()
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-8, msg=k)
    _assert_equal_state(eng.full_state_dict(), ref_model.state_dict(), exact=False)


@pytest.mark.integration
@pytest.mark.parametrize(("opt", "zero"), [("muon", 0), ("adamw", 2)])
def test_frozen_params_stay_bit_identical(opt, zero):
    model = make_model()
    for p in [*model.model.embed_tokens.parameters(), *model.model.layers[0].parameters()]:
        p.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _params(model)
    eng = TrainEngine(model, engine_config(opt, zero), loss_fn)
    train(eng, model, 0, 3)
    after = _params(model)
    for n, t in frozen.items():
        assert torch.equal(after[n], t), n
    assert all(not torch.equal(after[n], before[n]) for n in after if n not in frozen)


class _TinyMLP(nn.Module):
    """Model-agnostic check of the bf16 plumbing (embedding -> linear -> head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, VOCAB, bias=False)
        self.head.is_output_head = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.embed(ids))))  # (T, V)


@pytest.mark.integration
@pytest.mark.parametrize(("opt", "zero"), [("muon", 0), ("adamw", 2)])
def test_bf16_is_autocast_over_fp32_master_weights(opt, zero, tmp_path):
    seen = set()

    def mlp_loss(model, mb):
        logits = model(mb["input_ids"])
        seen.add(logits.dtype)
        loss_sum = F.cross_entropy(logits.float(), mb["labels"], ignore_index=-100, reduction="sum")
        return LossResult(loss_sum=loss_sum, num_tokens=int((mb["labels"] != -100).sum()))

    torch.manual_seed(0)
    model = _TinyMLP()
    cfg = engine_config(opt, zero, m=2).model_copy(update={"precision": "bf16"})
    eng = TrainEngine(model, cfg, mlp_loss)
    losses = [eng.train_step(global_batch(s, 2)).loss for s in range(12)]
    assert seen == {torch.bfloat16} and sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights stay fp32
    exported = load_safetensors(eng.export_weights(tmp_path / "w.safetensors"))
    _assert_equal_state(exported, {k: v.detach() for k, v in model.state_dict().items()})


@pytest.mark.integration
def test_moe_lm_trains_under_bf16_autocast():
    model = make_model()
    eng = TrainEngine(model, engine_config("muon", 0, m=2).model_copy(update={"precision": "bf16"}), loss_fn)
    assert train(eng, model, 0, 2)[-1]["loss"] < 6.0


# ----------------------------------------------------------------------------------- NaN guard
def _opt_state(eng) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj.detach().clone()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    walk("opt", ckpt._optimizer_state(eng))
    return flat


@pytest.mark.integration
@pytest.mark.parametrize(("opt", "zero"), [("muon", 0), ("adamw", 0), ("adamw", 1)])
def test_nonfinite_steps_are_skipped_then_diverge(opt, zero, tmp_path):
    model = make_model()
    eng = TrainEngine(model, engine_config(opt, zero, m=2, max_consecutive_nonfinite=3), loss_fn)

    def step(s, poison=None):
        mbs = global_batch(s, 2)
        if poison:
            mbs[1]["poison"] = poison
        return eng.train_step(mbs)

    for s in range(2):
        step(s)
    good = eng.save_checkpoint(checkpoint_path(tmp_path, 2))
    params, state = _params(model), _opt_state(eng)
    r = step(2, poison="add")  # only the loss value is NaN: grads are finite, the step must still be skipped
    assert r.skipped and eng.skipped_steps == 1 and eng.consecutive_nonfinite == 1 and r.step == 3
    _assert_equal_state(_params(model), params)
    _assert_equal_state(_opt_state(eng), state)
    r = step(3)
    assert not r.skipped and eng.consecutive_nonfinite == 0
    assert not torch.equal(_params(model)["lm_head.weight"], params["lm_head.weight"])
    params = _params(model)
    assert step(4, poison="mul").skipped and step(5, poison="mul").skipped
    with pytest.raises(DivergenceError, match=r"step 7: 3 consecutive"):
        step(6, poison="mul")
    assert eng.skipped_steps == 4
    _assert_equal_state(_params(model), params)
    ckpt.verify_checksums(good)  # the last good checkpoint is intact and loads
    fresh = TrainEngine(make_model(), engine_config(opt, zero, m=2), loss_fn)
    assert fresh.load_checkpoint(good) == {} and fresh.step == 2
