"""User-facing errors: one clear line, no traceback unless --debug.

Anything a user can cause (bad path, corrupt file, bad flag) is raised as a KimiError subclass.
"""

from __future__ import annotations


class KimiError(Exception):
    """An error the user can act on; the CLI prints its message and exits with `exit_code`."""

    exit_code = 1


class CheckpointError(KimiError):
    """A checkpoint directory, file or tensor is missing, truncated or not in a supported format."""


class UsageError(KimiError):
    """A bad flag or argument combination."""

    exit_code = 2
