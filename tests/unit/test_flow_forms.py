"""The flows' parameter forms as the Prefect UI renders them (``flow.parameters``, the schema a deployment
sends): one typed ``params`` object per flow (no untyped JSON field), descriptions without angle brackets
(the UI drops ``<...>`` as HTML), and every bound stated in words, because the Prefect 3 UI strips
``minimum``/``maximum``/``minLength``/``exclusiveMinimum`` from the schema it validates a form against:
a value out of range is refused only by the server when the run is created."""

from __future__ import annotations

import re

import pytest


def _flows():
    from flows.data_flow import data_flow
    from flows.pipeline import pipeline_flow
    from flows.stage_flow import stage_flow

    return {"pipeline": pipeline_flow, "stage": stage_flow, "data": data_flow}


def _fields(schema: dict):
    for model, d in schema["definitions"].items():
        for name, f in d["properties"].items():
            yield f"{model}.{name}", f


@pytest.mark.parametrize("name", ["pipeline", "stage", "data"])
def test_form_is_one_typed_params_object(name):
    schema = _flows()[name].parameters.model_dump()
    assert list(schema["properties"]) == ["params"]
    assert "$ref" in schema["properties"]["params"]


_BOUND_WORDS = {
    "minimum": lambda v: [f"at least {v}", f"{v} to "],
    "maximum": lambda v: [f" to {v}", f"at most {v}"],
    "exclusiveMinimum": lambda v: [f"above {v}"],
    "minLength": lambda v: ["not empty"] if v == 1 else [f"at least {v} characters"],
}


def form_problems(schema: dict) -> list[str]:
    """What a user of the Prefect form would miss: a field without description, text in angle brackets
    (dropped as an HTML tag), a bound the description does not state."""
    problems = []
    for field, f in _fields(schema):
        desc = f.get("description", "")
        if not desc:
            problems.append(f"{field}: no description")
        if re.search(r"<[A-Za-z/!$]", desc):
            problems.append(f"{field}: {desc!r} has <...>, which the UI drops")
        for key, say in _BOUND_WORDS.items():
            if key in f:
                v = int(f[key]) if float(f[key]).is_integer() else f[key]
                if not any(w in desc for w in say(v)):
                    problems.append(f"{field}: {key}={v} not stated in {desc!r}")
    return problems


@pytest.mark.parametrize("name", ["pipeline", "stage", "data"])
def test_descriptions_survive_html_and_state_their_bounds(name):
    assert form_problems(_flows()[name].parameters.model_dump()) == []


def test_form_problems_finds_an_unstated_bound_and_a_tag():
    from pydantic import BaseModel, Field

    class Form(BaseModel):
        n: int = Field(default=1, ge=0, le=10, description="how many")
        d: str = Field(default="x", description="goes to phases/<phase>/")

    schema = {"definitions": {"Form": Form.model_json_schema()}}
    assert form_problems(schema) == [
        "Form.n: minimum=0 not stated in 'how many'",
        "Form.n: maximum=10 not stated in 'how many'",
        "Form.d: 'goes to phases/<phase>/' has <...>, which the UI drops",
    ]
