"""Pipeline steps: typed pure functions (inputs + a typed config -> outputs + a manifest), runnable
without Prefect. ``Log`` is how every step reports progress lines (``print`` by default)."""

from collections.abc import Callable
from typing import Any

Log = Callable[[str], Any]
