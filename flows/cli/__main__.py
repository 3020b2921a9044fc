"""``python -m flows.cli`` = ``kimivl``."""

from flows.cli import app

app()
