"""The project's user-facing error types: bad input, never a bug.

Every entry point (``scripts/*.py``) runs under :func:`configs.run_entry_point`, which prints a
:class:`UserError` as one ``error: ...`` line and exits 2; any other exception is a bug and keeps
its traceback. Raise these (or a subclass) wherever input from the user (a config value, a path,
a file, a checkpoint) is found wrong, with a message that says what was expected.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: reported as ``error: <message>`` and exit status 2."""


class ConfigError(UserError, ValueError):
    """A bad config name, key or value; the message says what is valid."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the command needs does not exist; the message says how to make it."""


class CheckpointError(UserError, ValueError):
    """A file or folder that is not the kind of checkpoint the command expects."""
