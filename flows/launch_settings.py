"""How many processes train a phase, and the checks made before any of them starts.

One definition for both ways of launching: the CLI (``kimivl stage|train|run --nproc --launcher
--hostfile``) and the flows' ``launch`` parameter (``flows/launched_phase.py``). Importing this module
imports no torch (the CLI stays fast to start); the launch helpers are imported when a check runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# every rank runs this script (``stage NAME`` / ``train`` + the recipe, data and run directory + --worker)
ENTRY = Path(__file__).resolve().parents[1] / "tasks" / "train" / "rank_main.py"
# set by a launcher for each rank: a launch never inherits a parent's (e.g. an in-process rank's) values
DIST_ENV = frozenset(
    {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"}
)


def launcher_env() -> dict[str, str]:
    """This process's environment without the torch.distributed variables a launcher assigns."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


class LaunchError(ValueError):
    """A launch setting that cannot work; ``field`` names the setting (``nproc``, ``hostfile``, ...) or the
    recipe field (``in_recipe``: ``phases.N.micro_batches_per_step``) to change."""

    def __init__(self, field: str, message: str, in_recipe: bool = False) -> None:
        super().__init__(f"{'field ' if in_recipe else ''}{field}: {message}")
        self.field, self.message, self.in_recipe = field, message, in_recipe


class LaunchSettings(BaseModel):
    """How many processes train each phase (flow parameters; 1 = in the flow's own process)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    nproc: int = Field(
        default=1, ge=1, description="data-parallel training processes per node, at least 1 (1: in-process)"
    )
    launcher: Literal["torchrun", "deepspeed"] = Field(default="torchrun", description="with nproc > 1")
    hostfile: str | None = Field(
        default=None,
        description="multi-node: a DeepSpeed hostfile ('host slots=N' lines; deepspeed launcher)",
    )

    @property
    def launched(self) -> bool:
        return self.nproc > 1 or self.hostfile is not None

    def world_size(self) -> int:
        """Ranks this launch starts: ``nproc``, times the hostfile's hosts (``LaunchError`` if unreadable)."""
        from tasks.train.launch import launch_world_size

        try:
            return launch_world_size(self.nproc, Path(self.hostfile) if self.hostfile else None)
        except (OSError, ValueError) as e:
            raise LaunchError("hostfile", str(e)) from None

    def check(self, recipe: Any, phases: list[Any]) -> None:
        """Raise ``LaunchError`` before any work if these phases of ``recipe`` cannot run on this launch (or
        ``tasks.train.memory.MemoryPlanError`` if their model states cannot fit the CPU ranks' host)."""
        if not self.launched:
            return
        if self.hostfile is not None and self.launcher != "deepspeed":
            raise LaunchError(
                "hostfile", "only the deepspeed launcher reads a hostfile; torchrun runs one node"
            )
        from tasks.train.launch import batch_split_error

        world = self.world_size()
        if (err := batch_split_error(recipe, phases, world)) is not None:
            field, _, message = err.removeprefix("field ").partition(": ")
            raise LaunchError(field, message, in_recipe=True)
        from tasks.train.memory import check_launch

        check_launch(recipe, phases, world, self.nproc)  # MemoryPlanError: the model states cannot fit

    def command(self, args: list[str]) -> list[str]:
        """The launcher command line that runs ``tasks/train/rank_main.py *args --worker`` on every rank (after
        ``check``, which refuses the settings the launcher would)."""
        from tasks.train.launch import build_launch_command

        hostfile = Path(self.hostfile) if self.hostfile else None
        return build_launch_command([str(ENTRY), *args, "--worker"], self.nproc, self.launcher, hostfile)
