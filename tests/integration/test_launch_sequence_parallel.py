"""A recipe phase with ``sequence_parallel: 2``: the tiny recipe's joint_pretrain phase (packed images and
text, ViT + projector + MoE LM) launched on 2 ranks that split every packed sequence trains like 1 rank with
whole sequences: the same token counts per source, losses within 1e-5, weights as in
``assert_launched_weights_match``."""

from __future__ import annotations

import pytest
import torch

from tasks.io.weights import load_safetensors

pytestmark = pytest.mark.integration
LR = 2e-3


def assert_launched_weights_match(
    got: dict, ref: dict, recipe, *, muon_fro: float | None = None, adamw_steps: float = 0.1
) -> None:
    """Two launched runs of one phase that differ only in how the work is split: every Muon-updated matrix
    within 1e-5 of its magnitude (or, with ``muon_fro``, within that relative Frobenius error). Splitting
    sums in another order; where a gradient is at rounding level (a key bias, whose exact gradient is 0; an
    embedding row seen once), AdamW's normalisation turns that rounding into a sizeable step, so the
    AdamW-updated params are checked element-wise: 99.9% of their elements within 1e-5 of the magnitude,
    none off by more than ``adamw_steps`` LR steps. Every buffer (the routers' aux-free biases) is equal."""
    from kimivl_model.muon import build_param_groups
    from kimivl_model.vlm import KimiVL

    with torch.device("meta"):
        model = KimiVL(recipe.model.vlm_config())
    names = {id(p): n for n, p in model.named_parameters()}
    params = set(names.values())
    adamw = {
        names[id(p)] for g in build_param_groups(model, lr=1.0) if not g["use_muon"] for p in g["params"]
    }
    assert got.keys() == ref.keys() and "language_model.model.embed_tokens.weight" in adamw
    off = total = 0
    for name, w in ref.items():
        scale = max(float(w.abs().max()), 1e-3)
        diff = (got[name] - w).abs()
        if name not in params:  # buffers: the router biases move by +-rate steps, so any flip shows
            assert torch.equal(got[name], w), name
        elif name not in adamw:
            if muon_fro is None:
                assert float(diff.max()) <= 1e-5 * scale, name
            else:
                assert float(diff.norm()) <= muon_fro * float(w.norm()), name
        else:
            assert float(diff.max()) <= adamw_steps * LR, name
            off, total = off + int((diff > 1e-5 * scale).sum()), total + w.numel()
    assert off <= 1e-3 * total, (off, total)


def launch_phase(
    tiny_data,
    tmp_path,
    name: str,
    nproc: int,
    steps: int = 4,
    train: dict | None = None,
    data_root=None,
    **phase_fields,
):
    """The tiny recipe's joint_pretrain phase alone (``steps``-``steps + 1`` optimizer steps; gradients
    sharded to their owners, ``train`` overrides), launched on ``nproc`` ranks reading ``data_root``
    (default: the tiny data); returns (recipe, losses, final weights, result)."""
    import json

    import yaml

    from flows.launched_phase import LaunchSettings, run_phase_launched
    from tasks.recipe import load_recipe
    from tasks.tracking.local import MemoryTracker
    from tests.integration.conftest import short_recipe

    phase_name = "joint_pretrain"
    raw = short_recipe(shard_gradients=True, **(train or {})).model_dump(mode="json", by_alias=True)
    raw["phases"] = [p for p in raw["phases"] if p["name"] == phase_name]
    raw["eval"]["points"] = []
    p = raw["phases"][0]
    p.update(micro_batches_per_step=2, **phase_fields)
    p["token_budget"] = p["seq_len"] * 2 * steps
    p["lr"].update(mode="fresh", continue_from=None, peak_lr=LR, min_lr=LR / 10)  # the first phase here
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(tmp_path / f"{name}.yaml")
    sink, out = MemoryTracker(), tmp_path / name
    run_phase_launched(
        recipe,
        recipe.phase(phase_name),
        data_root or tiny_data[0],
        out,
        LaunchSettings(nproc=nproc),
        sink,
        log=lambda *_: None,
    )
    final = out / "phases" / phase_name / "final"
    result = json.loads((final / "result.json").read_text())
    result["loss_by_step"] = dict(sink.series("loss"))
    return recipe, [v for _, v in sink.series("loss")], load_safetensors(final / "model.safetensors"), result


@pytest.mark.timeout(900)
def test_launched_phase_with_sequence_parallel_trains_like_one_rank(tiny_data, tmp_path):
    recipe, ref_loss, ref_w, ref_result = launch_phase(tiny_data, tmp_path, "one", 1)
    _, sp_loss, sp_w, sp_result = launch_phase(tiny_data, tmp_path, "sp2", 2, sequence_parallel=2)
    assert len(ref_loss) >= 4 and sp_loss == pytest.approx(ref_loss, rel=1e-5)
    for key in ("steps", "tokens", "tokens_by_source"):
        assert sp_result[key] == ref_result[key], key
    assert ref_result["tokens"]["image"] > 0  # images went through the split
    # Sequence parallelism computes every token's projections on other row blocks (other rounding), not
    # just other sum orders; over 5 steps that reaches ~5e-5 (relative, Frobenius) in 2 of the last MoE
    # layer's 8 experts and stays <= 1e-5 elsewhere (measured; after 2 steps every matrix is within 1e-5):
    # the few-token gradients of those experts are low rank, and Newton-Schulz lifts their rounding-level
    # directions (the router biases, i.e. the expert loads' signs, are identical)
    assert_launched_weights_match(sp_w, ref_w, recipe, muon_fro=1e-4, adamw_steps=1.0)


@pytest.mark.timeout(900)
def test_sequence_parallel_phase_killed_mid_run_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """SIGKILL of the SP ranks after step 5 (a checkpoint at step 4): the rerun resumes from it and ends with
    the weights, token counts and per-step losses of an uninterrupted SP run, bit for bit."""
    _, _, ref_w, ref = launch_phase(tiny_data, tmp_path, "whole", 2, steps=6, sequence_parallel=2)
    monkeypatch.setenv("KIMIVL_CRASH_AT", "5")
    monkeypatch.setenv("KIMIVL_CRASH_NAME", "train:step:joint_pretrain")
    with pytest.raises(RuntimeError, match="exited with code"):
        launch_phase(tiny_data, tmp_path, "killed", 2, steps=6, sequence_parallel=2)
    monkeypatch.delenv("KIMIVL_CRASH_AT")
    monkeypatch.delenv("KIMIVL_CRASH_NAME")
    _, _, got_w, got = launch_phase(tiny_data, tmp_path, "killed", 2, steps=6, sequence_parallel=2)
    resumed = got["loss_by_step"]
    assert min(resumed) == 5 and max(resumed) == got["steps"] == ref["steps"] >= 6, resumed  # not restarted
    assert all(resumed[s] == ref["loss_by_step"][s] for s in resumed)
    assert got["tokens"] == ref["tokens"] and got["tokens_by_source"] == ref["tokens_by_source"]
    assert got_w.keys() == ref_w.keys() and all(torch.equal(got_w[k], v) for k, v in ref_w.items())
