"""The entry every launched training rank runs (``torchrun`` / the ``deepspeed`` launcher need a script):

    rank_main.py stage NAME --recipe R --data D --out O [--tracking-dir T] --worker
    rank_main.py train --recipe R --data D --out O --worker

(``kimivl stage|train --nproc N`` and the flows' ``launch`` parameter build this command line,
``flows/launch_settings.py``; the launcher sets RANK/WORLD_SIZE and may add ``--local_rank``.) It runs the
same ``tasks.train.phases.run_phases`` as the in-process command: progress lines from rank 0, one JSON
line of results from rank 0, and the exit code of ``phases.exit_code`` (2: fix the input, 1: training
stopped). The process that launched the ranks reports the results (table, summary) from the phases'
``result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tasks.data.row_store import data_location

# run as a script, this file's folder leads sys.path: its modules (``launch``, ``checkpoint``, ...) must not
# shadow top-level ones; the package itself is imported from the installed project
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="rank_main.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("stage", "train"))
    ap.add_argument("name", nargs="?", help="stage: a stage or one phase")
    ap.add_argument("--recipe", type=Path, required=True)
    ap.add_argument("--data", type=data_location, required=True)  # a directory or s3://bucket/prefix
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tracking-dir", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help="set by the launch command (marks a rank)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help="added by deepspeed")
    a = ap.parse_args(argv)
    if a.command == "stage" and not a.name:
        ap.error("stage needs NAME (a stage or a phase)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    from tasks.recipe import RecipeError, load_recipe
    from tasks.train.phases import check_inputs, exit_code, run_phases

    rank0 = int(os.environ.get("RANK", "0")) == 0
    log = print if rank0 else (lambda *_: None)  # every rank logs the same steps: once is enough
    try:
        recipe = load_recipe(a.recipe)
        check_inputs(recipe, a.data)
        phases = recipe.select(a.name) if a.command == "stage" else list(recipe.phases)
        results = run_phases(recipe, phases, a.data, a.out, a.tracking_dir, log=log)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"{'training stopped' if code == 1 else 'error'}: {e}", file=sys.stderr)
        return code
    if rank0:
        sys.stdout.write(json.dumps(results, sort_keys=True, default=str) + "\n")
    return 0


def leave(code: int) -> None:
    """Exit a rank without interpreter finalisation, after closing the process group (all ranks done: a
    barrier first): gloo's threads can abort a finished rank at exit ("terminate called without an
    active exception"), which the launcher would report as a failed job."""
    import logging

    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    leave(main())
