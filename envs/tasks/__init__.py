"""One task per file; importing this package registers them all."""

from . import (  # noqa: F401
    novel_noun,
    pick,
    place_next_to,
    place_on_top,
    push,
    push_to_target,
    reverse_stack,
    single_stack,
    stack_topple,
    swap,
    topple,
)
from .registry import ENV_ID, LEVELS, TASKS

__all__ = ["ENV_ID", "LEVELS", "TASKS"]
