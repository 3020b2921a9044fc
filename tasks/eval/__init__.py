"""Evaluation of checkpoints: held-out synthetic sets, needle-in-a-haystack, metrics and reports.

- ``heldout.py``: eval sets from the project's synthetic generators under a separate seed namespace, with an
  exact normalised-text overlap check against the training data;
- ``prompts.py``: records -> prompt token ids (ChatML or plain continuation) + pixel values;
- ``niah.py``: text and video needle-in-a-haystack (Kimi-VL report Table 2);
- ``metrics.py``: exact match, OCR character accuracy, grounding IoU, relaxed accuracy, math answers,
  teacher-forced losses;
- ``suite.py``: ``EvalConfig`` and ``run_eval`` (checkpoint -> eval.json, plots, report.md);
- ``report.py``: Markdown report, NIAH plots, ``compare_reports``.
"""
