"""Metric, param and tag names are made valid for MLflow before delivery (``tasks.tracking.mlflow_names.mlflow_key``):
checked against MLflow's own validators, valid names untouched, collisions and long names kept distinct."""

from __future__ import annotations

import random

import pytest
from mlflow.utils.validation import _validate_metric_name, _validate_param_name, _validate_tag_name

from tasks.tracking.mlflow_names import MAX_KEY, clean_keys, clean_params, clean_tags, mlflow_key

GX_METRIC = "data.validated.cot.by_expectation.expect_column_values_to_be_in_set(answer_verified)"


def _valid(name: str) -> None:
    for check in (_validate_metric_name, _validate_param_name, _validate_tag_name):
        check(name)


@pytest.mark.parametrize(
    "name",
    ["loss", "data.raw.caption.rows", "niah_text/recall_le_1024", "phases.sft.1.token_budget", "mlflow.parentRunId",
     "kimivl.role", "a-b c", "é_ü"],
)  # fmt: skip
def test_valid_names_are_unchanged(name):
    _valid(name)
    assert mlflow_key(name) == name
    assert clean_keys({name: 1.0}) == {name: 1.0}


def test_a_data_contract_metric_name_becomes_valid():
    with pytest.raises(Exception, match="Names may only contain"):
        _validate_metric_name(GX_METRIC)  # what MLflow did with it before: the whole batch was rejected
    key = mlflow_key(GX_METRIC)
    _valid(key)
    assert key == "data.validated.cot.by_expectation.expect_column_values_to_be_in_set_answer_verified_"


@pytest.mark.parametrize(
    ("name", "want"),
    [("a//b", "a/b"), ("/abs/x", "abs/x"), ("x/../y/./z", "x/__/y/_/z"), ("a:b", "a_b"), ("", "_"), ("..", "__"),
     ("tail/", "tail"), ("p[0]{1}", "p_0__1_"), ("..hidden", "_..hidden")],
)  # fmt: skip
def test_path_like_and_odd_names(name, want):
    assert mlflow_key(name) == want
    _valid(want)


def test_fuzzed_names_are_always_accepted_by_mlflow():
    rng = random.Random(0)
    alphabet = "ab/._- :()[]{}<>!?*\\\"'é\t\n%$#@~^|=+,;0"
    for _ in range(2000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        key = mlflow_key(name)
        _valid(key)
        assert 0 < len(key) <= MAX_KEY


def test_collisions_and_long_names_stay_distinct():
    values = {"a(b)": 1, "a_b_": 2, "a[b]": 3}
    out = clean_keys(values)
    assert len(out) == 3 and out["a_b_"] == 2  # the valid key keeps its name; the others get a digest
    assert sorted(out.values()) == [1, 2, 3]
    for k in out:
        _valid(k)
    assert clean_keys(dict(reversed(values.items()))) == out  # independent of the keys' order
    assert clean_keys({"a(b)": 1}) == {"a_b_": 1}  # no collision, no digest
    long = clean_keys({"x" * 300 + "a": 1, "x" * 300 + "b": 2})
    assert len(long) == 2 and all(len(k) == MAX_KEY for k in long)
    assert mlflow_key("x" * 300 + "a") == mlflow_key("x" * 300 + "a")  # deterministic


def test_params_and_tags_are_cleaned_too():
    params = clean_params({"contract": {"expect(x)": "ok"}, "k" * 400: "v"})
    assert "contract.expect_x_" in params
    for k in params:
        _valid(k)
        assert len(k) <= MAX_KEY
    assert clean_tags({"odd:tag": "v"}) == {"odd_tag": "v"}
