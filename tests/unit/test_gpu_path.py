"""The CUDA path: varlen attention backends, MoE dispatch (incl. ``torch._grouped_mm``), the tiny KimiVL
fwd+bwd (fp32 == CPU, bf16 autocast close), Muon, and the DeepSpeed ``TrainEngine`` in bf16 with a
bit-exact checkpoint resume.

Every test except the last one needs CUDA and is skipped without it (CPU CI skips them). On a GPU machine:

    python -m pytest tests/unit/test_gpu_path.py

flash-attn is optional: the tests that need it skip when it is not installed (``resolve_backend`` then
falls back to per-segment SDPA, which is checked here). ``torch.nn.attention.varlen.varlen_attn`` (torch's
own FlashAttention-2 varlen) is checked against the same reference when this torch has it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings

import pytest
import torch

# cuBLAS reads this when its first handle is created: needed for deterministic matmuls (resume test).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from kimivl_model.attention import (
    flash_attn_available,
    resolve_backend,
    torch_varlen_available,
    varlen_attention,
)
from kimivl_model.config import preset

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA: GPU-path test (skipped on CPU-only machines)")
DEV = torch.device("cuda") if CUDA else None

# MLA-like attention shapes: q/k head dim 192 (128 nope + 64 rope), v head dim 128 (padded to 192 inside)
HEADS, D_QK, D_V = 4, 192, 128
# repeated lengths (adjacent and separated runs), a 1-token and an empty document
LENS = [37, 128, 0, 1, 64, 64, 200, 128]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _cu(lens: list[int], device=None) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def naive_attention(q, k, v, lens, causal: bool, scale: float) -> torch.Tensor:
    """Per-document softmax attention in q's dtype (use fp64 for a reference)."""
    outs, s = [], 0
    for n in lens:
        if n == 0:
            continue
        qi, ki, vi = q[s : s + n], k[s : s + n], v[s : s + n]
        att = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        if causal:
            att = att.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", att.softmax(-1), vi))
        s += n
    return torch.cat(outs)


def _attn_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(LENS)
    q, k, v = (torch.randn(t, HEADS, d, generator=g) for d in (D_QK, D_QK, D_V))
    gout = torch.randn(t, HEADS, D_V, generator=g)
    return [x.to(DEV, dtype) for x in (q, k, v)], gout.to(DEV, dtype)


def _fwd_bwd(fn, qkv, gout):
    leaves = [x.detach().clone().requires_grad_() for x in qkv]
    out = fn(*leaves)
    out.backward(gout)
    return [out.detach()] + [x.grad for x in leaves]


def _reference(qkv, gout, causal, scale):
    return _fwd_bwd(
        lambda q, k, v: naive_attention(q, k, v, LENS, causal, scale),
        [x.double() for x in qkv],
        gout.double(),
    )


# ----------------------------------------------------------------------------------------- attention
@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_masked"])
def test_varlen_attention_backends_match_naive_reference(backend, dtype, causal):
    qkv, gout = _attn_inputs(dtype)
    scale = D_QK**-0.5
    cu = _cu(LENS, DEV)
    got = _fwd_bwd(
        lambda q, k, v: varlen_attention(q, k, v, cu, causal=causal, softmax_scale=scale, backend=backend),
        qkv,
        gout,
    )
    ref = _reference(qkv, gout, causal, scale)
    assert got[0].shape == (sum(LENS), HEADS, D_V) and got[0].dtype == dtype and got[0].is_cuda
    tol = 1e-4 if dtype == torch.float32 else 1.5e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_sdpa_and_masked_agree_bf16(causal):
    qkv, gout = _attn_inputs(torch.bfloat16, seed=1)
    cu = _cu(LENS, DEV)
    runs = {
        b: _fwd_bwd(lambda q, k, v, b=b: varlen_attention(q, k, v, cu, causal=causal, backend=b), qkv, gout)
        for b in ("sdpa", "sdpa_masked")
    }
    for name, a, b in zip(("out", "dq", "dk", "dv"), runs["sdpa"], runs["sdpa_masked"], strict=True):
        assert rel_err(a, b) < 1.5e-2, (name, rel_err(a, b))


@needs_cuda
def test_auto_backend_on_cuda_bf16():
    qkv, _ = _attn_inputs(torch.bfloat16)
    # flash-attn is an optional extra; torch's varlen_attn is the fallback fused kernel
    expected = "flash" if flash_attn_available() else ("torch_varlen" if torch_varlen_available() else "sdpa")
    assert resolve_backend("auto", qkv[0]) == expected
    assert resolve_backend("auto", qkv[0].float()) == "sdpa"  # fused kernels need half precision
    cu = _cu(LENS, DEV)
    a = varlen_attention(*qkv, cu, causal=True, backend="auto")
    b = varlen_attention(*qkv, cu, causal=True, backend="sdpa")
    assert rel_err(a, b) < 1.5e-2


@needs_cuda
@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn (optional 'gpu' extra) is not installed")
@pytest.mark.parametrize("causal", [True, False])
def test_flash_backend_matches_reference(causal):
    qkv, gout = _attn_inputs(torch.bfloat16)
    cu = _cu(LENS, DEV)
    got = _fwd_bwd(lambda q, k, v: varlen_attention(q, k, v, cu, causal=causal, backend="flash"), qkv, gout)
    ref = _reference(qkv, gout, causal, D_QK**-0.5)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert rel_err(a, b) < 1.5e-2, (name, rel_err(a, b))


@needs_cuda
@pytest.mark.skipif(not torch_varlen_available(), reason="this torch has no torch.nn.attention.varlen")
@pytest.mark.parametrize("causal", [True, False])
def test_torch_varlen_backend_matches_reference(causal):
    """torch's own FA2 varlen kernel (``backend="torch_varlen"``, the CUDA default without flash-attn)."""
    qkv, gout = _attn_inputs(torch.bfloat16)
    cu = _cu(LENS, DEV)
    scale = D_QK**-0.5
    got = _fwd_bwd(
        lambda q, k, v: varlen_attention(
            q, k, v, cu, causal=causal, softmax_scale=scale, backend="torch_varlen"
        ),
        qkv,
        gout,
    )
    ref = _reference(qkv, gout, causal, scale)
    assert got[0].shape == (sum(LENS), HEADS, D_V)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1.5e-2, (name, rel_err(a, b))
    assert not got[0][sum(LENS[:2]) : sum(LENS[:3])].any()  # the empty document


@needs_cuda
def test_auto_backend_under_autocast_casts_fp32_inputs_like_sdpa():
    """fp32 q/k/v inside bf16 autocast: the fused varlen backend runs in bf16, as SDPA would."""
    qkv, _ = _attn_inputs(torch.float32)
    cu = _cu(LENS, DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = varlen_attention(*qkv, cu, causal=True, backend="auto")
        b = varlen_attention(*qkv, cu, causal=True, backend="sdpa")
    assert a.dtype == b.dtype == torch.bfloat16
    assert rel_err(a, b) < 1.5e-2


# ----------------------------------------------------------------------------------------- KimiVL tiny
def _tiny_vlm_batch():
    from kimivl_model.image_processing import pack_images

    cfg = preset("tiny")
    pad = cfg.media_pad_token_id

    def img(h, w, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.rand(3, h * 14, w * 14, generator=g)

    def doc(n_pad, text):
        return torch.tensor([2, 6, 3, *[pad] * n_pad, 4, *text])

    pv, grid = pack_images([img(8, 8, 0), img(6, 4, 1)])
    n = [h * w // 4 for h, w in grid.tolist()]
    docs = [doc(n[0], range(100, 140)), doc(n[1], range(200, 240))]
    used = sum(d.numel() for d in docs)
    docs.append(torch.arange(300, 300 + 512 - used))
    ids = torch.cat(docs)
    cu = torch.tensor([0, *torch.tensor([d.numel() for d in docs]).cumsum(0).tolist()])
    labels = torch.cat([torch.cat((d[1:], torch.tensor([-100]))) for d in docs])
    labels[labels == pad] = -100
    return {"input_ids": ids, "cu_seqlens": cu, "labels": labels, "pixel_values": pv, "grid_hws": grid}


def _vlm_step(model, batch, device, autocast: bool = False):
    b = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(
            b["input_ids"],
            cu_seqlens=b["cu_seqlens"],
            labels=b["labels"],
            pixel_values=b["pixel_values"],
            grid_hws=b["grid_hws"],
            return_logits=False,
        )
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@needs_cuda
def test_tiny_kimivl_fwd_bwd_cuda_matches_cpu_and_bf16_is_close():
    from kimivl_model.vlm import KimiVL

    batch = _tiny_vlm_batch()
    torch.manual_seed(0)
    cpu = KimiVL(preset("tiny"), attn_backend="auto").train()
    gpu = copy.deepcopy(cpu).to(DEV)
    gpu_bf16 = copy.deepcopy(cpu).to(DEV)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # the conv patch embed
    try:
        o_cpu, g_cpu = _vlm_step(cpu, batch, "cpu")
        o_gpu, g_gpu = _vlm_step(gpu, batch, DEV)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert g_cpu.keys() == g_gpu.keys() and len(g_cpu) > 0
    assert float(o_gpu.loss.detach()) == pytest.approx(float(o_cpu.loss.detach()), rel=1e-4)
    assert float(o_gpu.aux_loss) == pytest.approx(float(o_cpu.aux_loss), rel=1e-4)
    flat_cpu = torch.cat([g.flatten() for g in g_cpu.values()])
    flat_gpu = torch.cat([g_gpu[n].flatten() for n in g_cpu])
    assert rel_err(flat_gpu, flat_cpu) < 1e-4
    worst = max((rel_err(g_gpu[n], g) for n, g in g_cpu.items() if g.norm() > 0), default=0.0)
    assert worst < 1e-2, worst

    o_bf, g_bf = _vlm_step(gpu_bf16, batch, DEV, autocast=True)
    assert {p.dtype for p in gpu_bf16.parameters()} == {torch.float32}  # autocast over fp32 weights
    assert abs(float(o_bf.loss) - float(o_cpu.loss)) < 0.02 * float(o_cpu.loss)
    assert all(torch.isfinite(g).all() for g in g_bf.values())
    flat_bf = torch.cat([g_bf[n].flatten() for n in g_cpu])
    assert rel_err(flat_bf, flat_cpu) < 0.1


# ----------------------------------------------------------------------------------------- Muon
@needs_cuda
def test_muon_steps_on_cuda_match_cpu():
    from kimivl_model.muon import Muon, zeropower_via_newtonschulz5

    g = torch.Generator().manual_seed(0)
    shapes = {"w2d": (64, 96), "w_tall": (96, 40), "experts": (4, 32, 48), "norm": (64,), "embed": (50, 16)}
    init = {n: torch.randn(s, generator=g) * 0.1 for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(3)]
    finals = []
    for dev in ("cpu", DEV):
        ps = {n: torch.nn.Parameter(t.clone().to(dev)) for n, t in init.items()}
        opt = Muon(
            [
                {"params": [ps["w2d"], ps["w_tall"], ps["experts"]], "use_muon": True},
                {"params": [ps["norm"], ps["embed"]], "use_muon": False},
            ],
            lr=0.02,
        )
        for step in grads:
            for n, p in ps.items():
                p.grad = step[n].to(dev)
            opt.step()
        finals.append({n: p.detach().cpu() for n, p in ps.items()})
    for n in shapes:
        torch.testing.assert_close(finals[1][n], finals[0][n], rtol=1e-5, atol=2e-6, msg=n)
        assert not torch.equal(finals[0][n], init[n]), n
    # bf16 Newton-Schulz on the GPU (allowed by the API) stays close to the fp32 one
    m = torch.randn(4, 256, 512, device=DEV)
    a = zeropower_via_newtonschulz5(m)
    b = zeropower_via_newtonschulz5(m, dtype=torch.bfloat16)
    assert rel_err(b, a) < 0.1


# ----------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def cuda_engine_env():
    """DeepSpeed on the CUDA accelerator (tests/conftest.py defaults DS_ACCELERATOR to cpu for CPU CI)."""
    if not CUDA:
        pytest.skip("needs CUDA: GPU-path test (skipped on CPU-only machines)")
    pytest.importorskip("pydantic", reason="TrainEngine needs pydantic")
    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cuda"
    pytest.importorskip("deepspeed", reason="TrainEngine needs deepspeed")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cuda":
        pytest.skip(
            f"DeepSpeed's accelerator was resolved to {get_accelerator().device_name()!r} in this process"
        )
    yield
    os.environ.clear()
    os.environ.update(saved)


def _to(mb: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}


def _cuda_loss_fn(model, mb):
    from tests.integration._engine_worker import loss_fn

    return loss_fn(model, _to(mb, DEV))


def _train(eng, model, start: int, stop: int, loss_batches_on_cuda: bool = True) -> list[float]:
    from tests.integration._engine_worker import global_batch

    losses = []
    for s in range(start, stop):
        mbs = global_batch(s, eng.cfg.micro_batches_per_step)
        r = eng.train_step([_to(mb, DEV) for mb in mbs] if loss_batches_on_cuda else mbs)
        assert not r.skipped
        model.update_router_bias(r.expert_load)
        losses.append(r.loss)
    return losses


@needs_cuda
@pytest.mark.parametrize(("opt", "zero"), [("muon", 0), ("adamw", 2)])
def test_engine_bf16_on_cuda_loss_falls(cuda_engine_env, opt, zero):
    from tasks.train.engine import TrainEngine
    from tests.integration._engine_worker import engine_config, make_model

    model = make_model()
    cfg = engine_config(opt, zero, m=2).model_copy(update={"precision": "bf16"})
    eng = TrainEngine(model, cfg, _cuda_loss_fn)
    assert (
        eng.device_type == "cuda" and eng.precision == "bf16" and eng.ds_config["torch_autocast"]["enabled"]
    )
    losses = _train(eng, model, 0, 20)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    assert all(p.is_cuda and p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


@needs_cuda
def test_engine_accepts_cpu_micro_batches_like_the_runner(cuda_engine_env):
    """tasks/train/runner.py hands the engine the loader's CPU tensors; on CUDA they must reach the GPU."""
    from tasks.train.engine import TrainEngine
    from tests.integration._engine_worker import engine_config, loss_fn, make_model

    model = make_model()
    eng = TrainEngine(model, engine_config("muon", 0, m=2).model_copy(update={"precision": "bf16"}), loss_fn)
    losses = _train(eng, model, 0, 2, loss_batches_on_cuda=False)
    assert all(math.isfinite(v) for v in losses)


@needs_cuda
def test_engine_checkpoint_resume_is_bit_exact_on_cuda(cuda_engine_env, tmp_path):
    from tasks.train.checkpoint import checkpoint_path
    from tasks.train.engine import TrainEngine
    from tests.integration._engine_worker import engine_config, make_model

    cfg = engine_config("muon", 0, m=2).model_copy(update={"precision": "bf16"})
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # atomics in index_add/SDPA backward otherwise
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = make_model()
            eng = TrainEngine(model, cfg, _cuda_loss_fn)
            first = _train(eng, model, 0, 4)
            ck = eng.save_checkpoint(checkpoint_path(tmp_path, 4), {"next_step": 4})
            ref = _train(eng, model, 4, 8)
            ref_state = eng.full_state_dict()

            again = make_model()  # an identical fresh run: the GPU math itself must be deterministic
            eng2 = TrainEngine(again, cfg, _cuda_loss_fn)
            assert _train(eng2, again, 0, 4) == first

            resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
            eng3 = TrainEngine(resumed, cfg, _cuda_loss_fn)
            assert eng3.load_checkpoint(ck) == {"next_step": 4} and eng3.step == 4
            got = _train(eng3, resumed, 4, 8)
        nondet = sorted({str(w.message)[:160] for w in caught if "determinis" in str(w.message)})
        assert got == ref, (got, ref, nondet)
        state = eng3.full_state_dict()
        assert state.keys() == ref_state.keys()
        for k in ref_state:
            assert torch.equal(state[k], ref_state[k]), (k, nondet)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


# ----------------------------------------------------------------------------------------- bench.gpu
@pytest.mark.skipif(CUDA, reason="checks the no-CUDA behaviour of bench.gpu")
def test_bench_gpu_without_cuda_prints_skipped_and_writes_nothing(tmp_path, capsys):
    from bench import gpu

    out = gpu.main(["--out-dir", str(tmp_path)])
    assert out["skipped"] == "no CUDA" and out["bench"] == "gpu"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert list(tmp_path.iterdir()) == []
