"""Shared by the synthetic-corpus tests (test_synth.py, test_synth_answers.py): the corpus config, the test's
own table of the synthetic world, and small row helpers. The ``corpus`` fixture built from CFG is in conftest.py."""

from __future__ import annotations

import json

from tasks.data.synth import SynthConfig

CFG = SynthConfig(
    seed=3, caption=40, grounding=30, ocr=20, chart_qa=40, doc_qa=24, interleaved=12, video_qa=20,
    video_haystack=3, long_doc=3, text=60, sft=40, cot=64, long_doc_words=1200, exact_duplicate_rate=0.1,
    near_duplicate_rate=0.1, corrupt_rate=0.1, rows_per_shard=16,
)  # fmt: skip
# the test's own table of the synthetic world (not imported from the generator)
COLOR_RGB = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
             "orange": (245, 135, 30), "purple": (135, 60, 180), "black": (25, 25, 25), "pink": (240, 120, 180)}  # fmt: skip
CORNERS = {"circle": 0, "triangle": 3, "square": 4, "diamond": 4, "hexagon": 6, "star": 10}


def synth_meta(row):
    return json.loads(row["meta"])["synth"]


def clean(rows):
    """Rows that are neither corrupt nor near-duplicates (exact duplicates are clean copies)."""
    return [
        r for r in rows if synth_meta(r)["corruption"] is None and synth_meta(r)["duplicate_method"] != "near"
    ]


def strings(row) -> list[str]:
    return [row["text"]] if row["text"] is not None else [m["content"] for m in row["messages"]]


def check_roles(msgs):
    roles = [m["role"] for m in msgs]
    body = roles[1:] if roles[0] == "system" else roles
    assert body == ["user", "assistant"] * (len(body) // 2), roles
    return body
