"""One Great Expectations suite per dataset kind, built as code over the derived columns (``derive.py``).

Every suite = the common base (identity, structure, media/placeholder consistency, image sanity, meta,
conversation shape) + the kind's own rules (allowed content form and media kind, text and image-count
bounds, and ground-truth checks: ``answer_verified`` for ``cot``/``synthetic_qa``, ``boxes_in_range`` for
``grounding``, ``num_frames`` for the video kinds). Bounds come from ``KIND_SPECS`` and can be overridden
per kind (or for all kinds with ``"*"``) without touching code (``specs.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

import great_expectations as gx
import great_expectations.expectations as gxe

from data_contracts.specs import (
    CONVERSATIONAL,
    DATASET_SUITE,
    UNKNOWN_KIND_SUITE,
    VIDEO_KINDS,
    Bound,
    resolve_spec,
)
from tasks.data.schema import KINDS


def _between(col: str, b: Bound) -> gxe.Expectation:
    return gxe.ExpectColumnValuesToBeBetween(column=col, min_value=b[0], max_value=b[1])


def _base(*, kind_set: list[str], dataset_level: bool) -> list[gxe.Expectation]:
    """Rules every record must satisfy whatever its kind."""
    exps: list[gxe.Expectation] = [
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="id", min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="kind"),
        gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=kind_set),
        gxe.ExpectColumnValuesToNotBeNull(column="source"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="source", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="placeholders_match", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="images_well_formed", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="meta_is_json_object", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="has_reserved_tokens", value_set=[False]),
        gxe.ExpectColumnValuesToBeInSet(column="roles_valid", value_set=[True]),  # rows with messages
        gxe.ExpectColumnValuesToBeInSet(column="turns_nonempty", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"]),
    ]
    if dataset_level:
        exps.insert(1, gxe.ExpectColumnValuesToBeUnique(column="id"))
    return exps


def build_suite(
    kind: str,
    bounds: Mapping[str, Mapping[str, Bound]] | None = None,
    *,
    dataset_level: bool = True,
    name: str | None = None,
) -> gx.ExpectationSuite:
    """The suite for ``kind``; ``dataset_level=False`` leaves id uniqueness to ``build_dataset_suite``."""
    spec = resolve_spec(kind, bounds)
    exps = _base(kind_set=[kind], dataset_level=dataset_level)
    exps += [
        gxe.ExpectColumnValuesToBeInSet(column="content_form", value_set=list(spec.content_forms)),
        gxe.ExpectColumnValuesToBeInSet(column="media_kind", value_set=list(spec.media_kinds)),
    ]
    exps += [_between(col, b) for col, b in spec.bounds.items() if col != "num_frames"]
    if kind in CONVERSATIONAL:
        # conversational kinds must carry messages (content_form above) and end on the answer
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column="last_role"))
    if kind in VIDEO_KINDS:
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column="num_frames"))
        exps.append(_between("num_frames", spec.bounds.get("num_frames", (1, None))))
    if kind in ("cot", "synthetic_qa"):
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="answer_verified", value_set=[True]))
    if kind == "grounding":
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="boxes_in_range", value_set=[True]))
    suite = gx.ExpectationSuite(name=name or kind)
    for e in exps:
        suite.add_expectation(e)
    return suite


def build_unknown_kind_suite(name: str = UNKNOWN_KIND_SUITE) -> gx.ExpectationSuite:
    """Base rules only, with ``kind in KINDS``: what a row of an unknown kind is checked against."""
    suite = gx.ExpectationSuite(name=name)
    for e in _base(kind_set=list(KINDS), dataset_level=False):
        suite.add_expectation(e)
    return suite


def build_dataset_suite(name: str = DATASET_SUITE) -> gx.ExpectationSuite:
    """Dataset-wide rules of a mixed-kind ("auto") validation: ids unique across all kinds."""
    suite = gx.ExpectationSuite(name=name)
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="id"))
    return suite
