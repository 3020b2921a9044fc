"""Flow runs sharing a host: two training processes at once with a thread per CPU each (what a worker ran
before it set thread counts) vs CPUs // 2 threads each (``flows.services.run_thread_env(2)``, what
``kimivl serve --limit 2`` and the compose worker give each run), and one run alone for scale.

    python -m bench.concurrent_runs [--quick] [--repeats N]

Each contender is ``kimivl stage text_pretrain`` (a fresh process: imports, model build, training to the
phase's token budget, final checkpoint) on a copy of one small corpus; the concurrent contenders start two
such processes at the same moment and take the wall time until both are done. Rounds are interleaved
(oversubscribed, shared, alone; the order reversed every other round); medians.

``ratio`` = oversubscribed seconds / shared seconds: how much longer two runs take when each spins a
thread per CPU. ``per_run_vs_alone``: the shared pair's seconds over one run alone (2.0 = the pair costs
exactly two runs' time; below 2 = some overlap of start-up with training).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import bench_main, rnd
from flows.services import host_cpus, run_thread_env

ROOT = Path(__file__).resolve().parents[1]


def _recipe(quick: bool) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].setdefault("synth", {}).update(text=24, long_doc=1, cot=8, long_doc_words=400)
    raw["phases"] = [p for p in raw["phases"] if p["name"] == "text_pretrain"]
    raw["phases"][0]["token_budget"] = 4096 if quick else 24576
    raw["eval"]["points"] = []
    return raw


def _env(threads: dict[str, str] | None) -> dict[str, str]:
    drop = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": str(ROOT), **(threads or {})}


def _cmd(recipe: Path, data: Path, out: Path) -> list[str]:
    kimivl = Path(sys.executable).parent / "kimivl"
    head = [str(kimivl)] if kimivl.is_file() else [sys.executable, "-m", "flows.cli"]
    return [*head, "stage", "text_pretrain", "--recipe", str(recipe), "--data", str(data), "--out", str(out)]


def _together(cmds: list[list[str]], env: dict[str, str], cwd: Path) -> float:
    """Wall seconds until every command (started at once) has finished."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(c, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    errs = [p.communicate(timeout=3600)[1] for p in procs]
    dt = time.perf_counter() - t0
    for p, err in zip(procs, errs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"exit {p.returncode}:\n{err[-3000:]}")
    return dt


def run(quick: bool = False, repeats: int | None = None) -> dict[str, Any]:
    from tasks.data.pipeline import run_data_all
    from tasks.recipe import recipe_from_dict

    repeats = repeats or (1 if quick else 2)
    cpus = host_cpus()
    shared = run_thread_env(2, environ={}, cpus=cpus)
    contenders = {
        "oversubscribed": (2, {"OMP_NUM_THREADS": str(cpus), "MKL_NUM_THREADS": str(cpus)}),
        "shared": (2, shared),
        "alone": (1, {"OMP_NUM_THREADS": str(cpus), "MKL_NUM_THREADS": str(cpus)}),
    }
    with tempfile.TemporaryDirectory(prefix="bench-concurrent-") as tmp:
        root = Path(tmp)
        raw = _recipe(quick)
        recipe = root / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        run_data_all(recipe_from_dict(raw).data, root / "data", log=lambda *_: None)
        samples: dict[str, list[float]] = {n: [] for n in contenders}
        names = list(contenders)
        for r in range(repeats + 1):  # round 0 warms caches (DeepSpeed's op build, page cache): not kept
            for name in names if r % 2 == 0 else reversed(names):
                n, threads = contenders[name]
                outs = [root / f"out-{name}-{i}" for i in range(n)]
                for o in outs:
                    shutil.rmtree(o, ignore_errors=True)
                dt = _together([_cmd(recipe, root / "data", o) for o in outs], _env(threads), root)
                if r > 0:
                    samples[name].append(dt)
    med = {n: statistics.median(v) for n, v in samples.items()}
    return {
        "phase_token_budget": raw["phases"][0]["token_budget"],
        "cpus": cpus,
        "threads_shared": shared,
        "threads_oversubscribed": cpus,
        "repeats": repeats,
        "seconds": {n: [rnd(x) for x in v] for n, v in samples.items()},
        "median_s": {n: rnd(v) for n, v in med.items()},
        "ratio": rnd(med["oversubscribed"] / med["shared"]),
        "per_run_vs_alone": rnd(med["shared"] / med["alone"]),
    }


def main(argv: list[str] | None = None) -> dict:
    def add(ap):
        ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 2; 1 with --quick)")

    return bench_main("concurrent_runs", __doc__, run, argv, add)


if __name__ == "__main__":
    main()
