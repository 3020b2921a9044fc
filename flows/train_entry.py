"""Script entry for launchers (torchrun / deepspeed need a script path): runs the ``kimivl`` CLI."""

from flows.cli import app

if __name__ == "__main__":
    app()
