"""Passage questions for QA synthesis: built by sampling a record's plain text (its *passage*), verified by
re-deriving the answer from the passage.

Two kinds: cloze ("fill in the blank", answer = the blanked word) and "which word comes right after X".
A question is only emitted when the passage determines its answer uniquely; ``passage_fact_for`` recovers
the ground truth of such a question (or says it is ambiguous) when a generator model proposes one.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from tasks.data.qa_facts import Fact

STOPWORDS = frozenset(
    [
        "the",
        "a",
        "an",
        "and",
        "or",
        "but",
        "if",
        "then",
        "than",
        "that",
        "this",
        "these",
        "those",
        "with",
        "from",
        "into",
        "onto",
        "over",
        "under",
        "about",
        "which",
        "what",
        "when",
        "where",
        "while",
        "there",
        "their",
        "they",
        "them",
        "have",
        "has",
        "had",
        "been",
        "being",
        "were",
        "was",
        "are",
        "is",
        "for",
        "not",
        "can",
        "will",
        "would",
        "should",
        "could",
        "also",
        "such",
        "each",
        "other",
        "more",
        "most",
        "some",
        "only",
        "very",
        "just",
        "its",
        "it's",
        "your",
        "you",
        "our",
    ]
)
WORD_RE = re.compile(r"[A-Za-z]+")
BLANK = "____"
CLOZE_Q = 'Fill in the blank in this sentence from the passage: "{}"'
FOLLOW_Q = 'In the passage, which word comes right after "{}"?'


def _sentences(passage: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n", passage) if s.strip()]


def resolve_cloze(passage: str, sentence_with_blank: str) -> set[str]:
    """Every word that fills the blank so the sentence occurs in the passage (lower-cased)."""
    if sentence_with_blank.count(BLANK) != 1:
        return set()
    left, right = sentence_with_blank.split(BLANK)
    pat = re.compile(r"(?<![A-Za-z])" + re.escape(left) + r"([A-Za-z]+)" + re.escape(right))
    flat = " ".join(passage.split())
    return {m.group(1).lower() for m in pat.finditer(flat)}


def resolve_follows(passage: str, phrase: str) -> set[str]:
    """Every word that comes right after ``phrase`` (whole words) in the passage (lower-cased)."""
    pat = re.compile(r"(?<![A-Za-z0-9])" + re.escape(phrase) + r"[\s,;:]+([A-Za-z0-9]+)")
    return {m.group(1).lower() for m in pat.finditer(" ".join(passage.split()))}


def sample_passage_fact(passage: str, rng: Any, tries: int = 8) -> Fact | None:
    """One cloze or follows question with a unique answer in ``passage`` (or None)."""
    sents = [s for s in _sentences(" ".join(passage.split())) if 5 <= len(s.split()) <= 60]
    content = sorted(
        {w.lower() for w in WORD_RE.findall(passage) if len(w) >= 4 and w.lower() not in STOPWORDS}
    )
    for _ in range(tries if sents else 0):
        s = rng.choice(sents)
        words = list(re.finditer(r"[A-Za-z]+", s))
        cands = [m for m in words if len(m.group()) >= 4 and m.group().lower() not in STOPWORDS]
        if not cands:
            continue
        if rng.random() < 0.5:
            m = rng.choice(cands)
            q_sent = s[: m.start()] + BLANK + s[m.end() :]
            if resolve_cloze(passage, q_sent) != {m.group().lower()}:
                continue
            ans, source, question = m.group(), "cloze", CLOZE_Q.format(q_sent)
        else:
            toks = s.split()
            k = rng.randrange(3, len(toks))
            phrase, nxt = " ".join(toks[k - 3 : k]), re.match(r"[A-Za-z0-9]+", toks[k])
            if (
                nxt is None
                or nxt.group().lower() in STOPWORDS
                or (len(nxt.group()) < 3 and not nxt.group().isdigit())
                or not re.search(r"[A-Za-z0-9]$", phrase)
                or resolve_follows(passage, phrase) != {nxt.group().lower()}
            ):
                continue
            ans, source, question = nxt.group(), "follows", FOLLOW_Q.format(phrase)
        wrong = tuple(w for w in content if w != ans.lower())[:50]
        picked = (rng.choice(wrong),) if wrong else (ans + "x",)
        return Fact(question, ans, "text", source, False, picked)
    return None


def passage_fact_for(question: str, passage: str) -> Fact | Literal["ambiguous"] | None:
    """The ground truth of a cloze/follows question about ``passage``; None if it is not one."""
    for template, resolve, source in (
        (CLOZE_Q, resolve_cloze, "cloze"),
        (FOLLOW_Q, resolve_follows, "follows"),
    ):
        head, tail = template.split("{}")
        if question.startswith(head) and question.endswith(tail):
            answers = resolve(passage, question[len(head) : len(question) - len(tail)])
            if len(answers) != 1:
                return "ambiguous"
            return Fact(question, next(iter(answers)), "text", source, False)
    return None
