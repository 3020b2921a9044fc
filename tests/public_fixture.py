"""Tests' access to ``scripts/make_public_checkpoint.py`` (the miniature public Kimi-VL checkpoint)."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


@cache
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_public_checkpoint", ROOT / "scripts/make_public_checkpoint.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
