"""Typed errors. Each carries its exit code and a hint telling the user what to do next.

`app.MlopsGroup.main` (what `mlops` and `app.main()` run) is the single place that turns them, and any other
exception, into a message on stderr and an exit code.
"""

from __future__ import annotations


class MlopsError(Exception):
    """Base class: an error the user can act on. Subclasses fix the exit code."""

    exit_code = 1
    default_hint: str | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint


class UsageError(MlopsError):
    """Bad option or argument (exit 2)."""

    exit_code = 2
    default_hint = "Run the command with --help to see its options."


class InputError(MlopsError):
    """Input missing, unreadable, corrupt or of an unsupported format (exit 3)."""

    exit_code = 3


class UnsafeInputError(MlopsError):
    """Input refused because loading it could run code (exit 4)."""

    exit_code = 4


class OutputError(MlopsError):
    """Output exists (and --force was not given) or cannot be written (exit 5)."""

    exit_code = 5


class ValidationFailed(MlopsError):
    """The operation ran but its result failed a check: parity, overflow, agreement (exit 6)."""

    exit_code = 6


class ResourceError(MlopsError):
    """Out of memory or disk (exit 7)."""

    exit_code = 7

