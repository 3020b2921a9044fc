"""The benchmarks' --quick mode, in-process: JSON shape, atomic result file, and every correctness check a
benchmark makes before timing (packed == padded loss, varlen == masked attention, loop reference == our
MoE, analytic comm bytes == DistributedMuon's, our LM == DeepseekV3ForCausalLM). Never timing."""

from __future__ import annotations

import json

import pytest
import torch

from bench import attention, checkpoint, common, data_pipeline, mfu, moe, muon, packing, peer
from kimivl_model.config import preset
from kimivl_model.moe import MoE


@pytest.fixture(autouse=True)
def _one_thread():
    """Nothing here is timed: one thread keeps these fast on a shared machine, where a 2-thread OpenMP
    region stalls whenever another process holds the second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


COMMON_KEYS = {"bench", "quick", "ours", "baseline", "ratio", "goal", "goal_met", "machine", "what"}
MACHINE_KEYS = {"cpu", "torch_threads", "loadavg_start", "loadavg_end", "torch", "date"}


def run_quick(module, name: str, tmp_path) -> dict:
    out = module.main(["--quick", "--out-dir", str(tmp_path)])
    assert set(out) >= COMMON_KEYS, COMMON_KEYS - set(out)
    assert out["bench"] == name and out["quick"] is True
    assert isinstance(out["goal_met"], bool)
    assert isinstance(out["ratio"], float) and out["ratio"] > 0
    assert set(out["machine"]) >= MACHINE_KEYS
    assert len(out["machine"]["loadavg_start"]) == 3 and out["machine"]["torch_threads"] >= 1
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert written == json.loads(json.dumps(out))
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.json"]  # no temp file left behind
    return out


@pytest.mark.timeout(600)
def test_checkpoint_quick(tmp_path):
    """2 torchrun ranks per format: both formats save and load; the same bytes, whatever the layout."""
    out = run_quick(checkpoint, "checkpoint", tmp_path)
    assert out["preset"] == "tiny" and out["repeats"] == 2
    for fmt in ("ours", "baseline"):
        assert out[fmt]["save_s"] > 0 and out[fmt]["load_s"] > 0 and out[fmt]["peak_rss_growth_mb"] >= 1.0
    assert out["ours"]["checkpoint_mb"] == pytest.approx(out["baseline"]["checkpoint_mb"], rel=0.1)


def test_data_pipeline_quick(tmp_path):
    out = run_quick(data_pipeline, "data_pipeline", tmp_path)
    assert out["seq_len"] == 256 and out["documents_packed"] > 0 and out["rows"] > 0
    eff, padded = out["packing_efficiency"], out["baseline"]["efficiency"]
    assert 0 < padded <= 1 and 0 < eff <= 1 and out["ours"]["efficiency"] == eff
    assert out["ratio"] == pytest.approx(eff / padded, abs=2e-3)
    assert out["goal_met"] == (eff >= data_pipeline.GOAL_EFFICIENCY and out["ratio"] > 1)
    for step in ("synth", "filter", "dedup", "tokenize"):
        assert out[f"{step}_rows_per_s"] > 0


def test_data_pipeline_rejects_bad_sizes():
    with pytest.raises(ValueError, match="--scale must be >= 1"):
        data_pipeline.run(scale=0)
    with pytest.raises(SystemExit):  # argparse: --scale takes an int
        data_pipeline.main(["--scale", "x", "--no-write"])


def test_packing_quick(tmp_path):
    out = run_quick(packing, "packing", tmp_path)
    assert out["first_step_loss"]["agree"] is True
    assert out["first_step_loss"]["packed"] == pytest.approx(out["first_step_loss"]["padded"], abs=1e-4)
    assert out["useful_tokens_per_pass"] < out["padded_tokens_per_pass"]


def test_padded_as_segments_masks_pads_and_last_tokens():
    docs = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    b = packing.padded_as_segments(docs)
    assert b["cu_seqlens"].tolist() == [0, 3, 6]
    assert b["input_ids"].tolist() == [5, 6, 7, 8, 9, 0]
    assert b["labels"].tolist() == [6, 7, -100, 9, -100, -100]


def test_attention_quick(tmp_path):
    out = run_quick(attention, "attention", tmp_path)
    assert out["outputs_agree"] is True
    assert all(r["max_abs_diff"] < 1e-4 for r in out["lengths"])
    assert all(sum(attention.packed_lengths(t, seed=0)) == t for t in (256, 1000, 4096))


def test_moe_quick_and_loop_reference_matches_ours(tmp_path):
    out = run_quick(moe, "moe", tmp_path)
    assert out["loop_reference_agrees"] is True
    assert out["activated_params_per_token"]["dense"] <= out["activated_params_per_token"]["moe"]
    torch.manual_seed(1)
    layer = MoE(preset("tiny").lm).train()
    x = torch.randn(64, layer.gate.weight.shape[1], requires_grad=True)
    assert moe.check_agree(layer, x, torch.randn(64, x.shape[1])) < 1e-5


def test_muon_quick_and_comm_model(tmp_path):
    out = run_quick(muon, "muon", tmp_path)
    worlds = [c["world_size"] for c in out["comm"]["per_world_size"]]
    assert worlds == list(muon.WORLD_SIZES)
    for c in out["comm"]["per_world_size"]:
        assert c["payload_ratio"] == pytest.approx(1.0, abs=1e-3)
        assert c["muon_collectives"] <= 1 + 2 * c["world_size"]
    assert out["params"]["muon"] < out["params"]["total"]
    assert muon.ns_flops((4, 8)) == 5 * (4 * 16 * 8 + 2 * 64)
    assert muon.ns_flops((3, 8, 4)) == 3 * 5 * (4 * 16 * 8 + 2 * 64)  # stacked, transposed orientation


def test_muon_comm_model_matches_distributed_muon_two_ranks():
    from kimivl_model.lm import KimiLM

    analytic = muon.comm_model(muon._group_numels(KimiLM(preset("tiny").lm)), 2)["muon_payload_bytes"]
    assert muon.measured_comm_bytes(2) == [analytic, analytic]


def test_mfu_quick(tmp_path):
    out = run_quick(mfu, "mfu", tmp_path)
    row = next(iter(out["ours"].values()))
    assert 0 < row["mfu"] == out["ratio"]
    assert out["peak_gemm_gflop_per_s"] > 0
    probes = out["peak_gemm_gflop_per_s_interleaved"]  # one per timed round, the best of all is the peak
    assert len(probes) == out["repeats"] and max(probes) <= out["peak_gemm_gflop_per_s"]
    assert "peak_probe" not in out["ours"] and set(out["mfu_vs_median_interleaved_peak"]) == set(out["ours"])
    cfg = preset("tiny").lm
    # one document of S tokens: 6 * L * S * H * (d_qk + d_v) per token
    expect = 6.0 * cfg.num_layers * 64 * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    assert mfu.attention_flops_per_token(cfg, [64, 64]) == pytest.approx(expect)


def test_lognormal_lengths_and_batches():
    lens = common.lognormal_lengths(200, lo=32, hi=2048, seed=0)
    assert min(lens) >= 32 and max(lens) <= 2048 and lens == common.lognormal_lengths(200, seed=0)
    docs = common.random_docs([3, 2], vocab=50)
    p, d = common.packed_batch(docs), common.padded_batch(docs)
    assert p["cu_seqlens"].tolist() == [0, 3, 5] and p["labels"].tolist()[2] == -100
    assert d["input_ids"].shape == (2, 3) and d["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert d["labels"][1, 2] == -100


@pytest.mark.skipif(
    not peer.transformers_available(),
    reason="transformers 5.x is not installed (the 'bench' extra): bench.peer needs DeepseekV3ForCausalLM",
)
def test_peer_quick_same_weights_same_loss(tmp_path):
    out = run_quick(peer, "peer", tmp_path)
    first = out["first_step_loss"]
    assert first["agree"] is True and first["abs_diff"] <= 1e-4
    assert out["doc_mix"]["useful_tokens"] < out["doc_mix"]["theirs_padded_tokens"]
    ours, theirs = peer.build_pair(preset("tiny").lm)  # strict load: every tensor mapped
    sd = theirs.state_dict()
    gate = ours.model.layers[1].mlp.experts.gate_proj
    assert torch.equal(sd["model.layers.1.mlp.experts.gate_up_proj"][:, : gate.shape[1]], gate.detach())


def test_overhead_weight_comparison_tells_noise_from_different_work(tmp_path):
    """bench.overhead's same-work check: per phase, the largest |a - b| over the tensor's largest |a|."""
    from safetensors.torch import save_file

    from bench.overhead import WEIGHT_RTOL, _weight_rel_diff

    def write(root, phase, tensors):
        d = root / "phases" / phase / "final"
        d.mkdir(parents=True)
        save_file(tensors, str(d / "model.safetensors"))

    w = {"a": torch.linspace(-2, 2, 100), "b": torch.ones(3, 3)}
    write(tmp_path / "x", "p", w)
    write(tmp_path / "same", "p", {k: v.clone() for k, v in w.items()})
    write(tmp_path / "noise", "p", {"a": w["a"] + 2e-4, "b": w["b"]})  # 1e-4 of max |a| = 2
    write(tmp_path / "other", "p", {"a": w["a"].flip(0), "b": w["b"]})
    write(tmp_path / "fewer", "p", {"a": w["a"]})
    assert _weight_rel_diff(tmp_path / "x", tmp_path / "same") == {"p": 0.0}
    assert _weight_rel_diff(tmp_path / "x", tmp_path / "noise")["p"] == pytest.approx(1e-4, rel=1e-3)
    assert _weight_rel_diff(tmp_path / "x", tmp_path / "other")["p"] > 100 * WEIGHT_RTOL
    assert _weight_rel_diff(tmp_path / "x", tmp_path / "fewer") == {"p": float("inf")}
    assert _weight_rel_diff(tmp_path / "x", tmp_path / "missing") == {"p": float("inf")}


def test_context_quick(tmp_path):
    """Measured tensor peaks (MemTracker), not timings: SP 2 must at least double-ish the trainable length."""
    from bench import context

    out = run_quick(context, "context", tmp_path)
    assert out["ours"]["longest_tokens"] > out["baseline"]["longest_tokens"] > 0
    assert out["ratio"] >= 1.5, out
    for probes in (out["ours"]["probes"], out["baseline"]["probes"]):
        assert all(p > 0 for _, p in probes)


def test_loader_quick(tmp_path):
    """Memory and counts, not timings: a rank's peak RSS does not grow with the corpus (10x vs 1x), each of
    2 ranks decodes its own micro-batches' images (together: every image once)."""
    from bench import loader

    out = run_quick(loader, "loader", tmp_path)
    assert out["rss_ratio"] <= 1.2, out
    assert sum(out["images_decoded_per_rank"]) == out["images_total"] > 0
    assert min(out["images_decoded_per_rank"]) > 0
    assert out["workers_ratio"] > 0 and out["ours"]["rank_cpu_ms_per_batch_2_workers"] > 0
