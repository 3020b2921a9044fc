"""The ``kimivl`` command (typer + rich). Thin: every command validates its input (exit 2 naming what is
wrong, before any work) and calls a ``tasks/`` function or a Prefect flow; nothing here is step logic.

Commands: ``model`` (model.py), ``smoke`` (model.py), ``data`` (data.py), ``stage`` / ``train``
(train.py), ``run`` (run.py), ``eval`` (eval.py), ``compare`` (compare.py), ``recipe`` / ``dvc-remote``
(recipe.py), ``up`` / ``down`` / ``serve`` (services.py, over ``flows/services.py``).
"""

from __future__ import annotations

import typer

from flows.cli.compare import compare_cmd
from flows.cli.data import data_app
from flows.cli.eval import eval_cmd
from flows.cli.model import model_app, smoke_cmd
from flows.cli.recipe import dvc_remote_cmd, recipe_app
from flows.cli.run import run_cmd
from flows.cli.services import down_cmd, serve_cmd, up_cmd
from flows.cli.train import stage_cmd, train_cmd

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Kimi-VL training system.")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.command("stage")(stage_cmd)
app.command("train")(train_cmd)
app.command("run")(run_cmd)
app.command("eval")(eval_cmd)
app.command("compare")(compare_cmd)
app.command("serve")(serve_cmd)
app.command("up")(up_cmd)
app.command("down")(down_cmd)
app.add_typer(recipe_app, name="recipe")
app.command("dvc-remote")(dvc_remote_cmd)
app.command("smoke")(smoke_cmd)
