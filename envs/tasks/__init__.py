"""One task per file; importing this package registers them all."""

from . import pick, place_on_top  # noqa: F401
from .registry import ENV_ID, LEVELS, TASKS

__all__ = ["ENV_ID", "LEVELS", "TASKS"]
