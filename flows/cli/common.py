"""What every command shares: the console (stderr), one way to fail (exit 2 = bad input, 1 = the work
stopped), loading the recipe (its ``RecipeError`` names the file and field), JSON on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# soft_wrap: a long line (an `export ...` hint, a URL) stays one line to copy, whatever the terminal width
console = Console(stderr=True, soft_wrap=True)
RECIPE = typer.Option(Path("params.yaml"), "--recipe", "-r", help="recipe YAML")


def fail(msg: str, code: int = 2, label: str = "error") -> NoReturn:
    console.print(f"[bold red]{label}:[/] {escape(msg)}")
    raise typer.Exit(code)


def log(msg: str) -> None:
    """A progress line exactly as given (no rich markup: a ``[phase]`` prefix is text, not a style)."""
    console.print(msg, markup=False, highlight=False)


def load_recipe_or_exit(path: Path) -> Any:
    from tasks.recipe import RecipeError, load_recipe

    try:
        return load_recipe(path)
    except RecipeError as e:
        fail(str(e))


def emit(obj: Any) -> None:
    """One JSON object on stdout (the machine-readable result of a command)."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
