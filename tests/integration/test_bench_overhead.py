"""bench.overhead does the same work through both paths: the Prefect + MLflow flow and the plain step
functions produce bit-identical weights for every phase (the figures are timing; they are not checked)."""

from __future__ import annotations

import pytest

from bench.overhead import run


@pytest.mark.integration
def test_flow_and_direct_steps_do_the_same_work():
    res = run(quick=True, dvc=False, repeats=1)
    # same work: the same phases and weights within WEIGHT_RTOL (bit identity is reported, not required:
    # a rare 1-ulp difference in one process's first aux loss grows to ~1e-4 under Muon; bench/overhead.py)
    assert res["same_work"] is True and res["phases"] == ["align", "text_pretrain"], res[
        "weight_max_rel_diff"
    ]
    assert set(res["weight_max_rel_diff"]["flow"]) == {"align", "text_pretrain"}
    assert isinstance(res["same_weights"], bool)
    if res["same_weights"]:
        assert set(res["weight_max_rel_diff"]["flow"].values()) == {0.0}
    assert set(res["seconds"]) == {"direct", "flow"} and all(v > 0 for v in res["seconds"].values())
    assert res["ratio"] == pytest.approx(res["seconds"]["flow"] / res["seconds"]["direct"], rel=1e-3)
    fastest = min(res["samples"]["flow"]) / min(res["samples"]["direct"])
    assert res["ratio_of_fastest"] == pytest.approx(fastest, rel=1e-2)
    assert all(len(v) == 1 and v[0] > 0 for v in res["cpu_samples"].values())
    assert res["cpu_ratio"] == pytest.approx(
        res["cpu_seconds"]["flow"] / res["cpu_seconds"]["direct"], rel=1e-2
    )
    assert isinstance(res["goal_met"], bool) and res["goal"].startswith("flow/direct <=")
    # the work clock: time inside the shared step functions is most of each run, the rest is outside
    for k in ("direct", "flow"):
        assert 0 < res["work_seconds"][k] < res["seconds"][k]
        assert res["outside_seconds"][k] == pytest.approx(
            res["seconds"][k] - res["work_seconds"][k], abs=0.02
        )
    overhead = res["outside_seconds"]["flow"] - res["outside_seconds"]["direct"]
    assert res["overhead_seconds"] == pytest.approx(overhead, abs=0.02)
    assert res["ratio_accounted"] == pytest.approx(1 + overhead / res["seconds"]["direct"], rel=1e-2)
    assert isinstance(res["goal_met_accounted"], bool) and res["work_ratio"] > 0
