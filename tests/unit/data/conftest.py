"""Fixtures shared by the tests in tests/unit/data."""

from __future__ import annotations

import pytest

from tasks.data.io import iter_rows
from tasks.data.schema import RECORD_SCHEMA
from tasks.data.synth import SYNTH_KINDS, run_synth
from tests.unit.data._synth_common import CFG


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The synthetic corpus generated once (expensive) for test_synth.py and test_synth_answers.py:
    (root, manifests by kind, rows by kind)."""
    root = tmp_path_factory.mktemp("synth")
    manifests = run_synth(root, CFG)
    rows = {k: list(iter_rows(root / k, RECORD_SCHEMA)) for k in SYNTH_KINDS}
    return root, manifests, rows
