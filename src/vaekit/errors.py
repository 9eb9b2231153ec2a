"""The exception types and exit codes shared by the API, the CLI and the server."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the ``vaekit`` command."""

    OK = 0
    FAILURE = 1
    BAD_INPUT = 2


class VaekitError(Exception):
    """A failure with a one-line message meant for the user."""

    exit_code = ExitCode.FAILURE


class BadInputError(VaekitError):
    """The user's input (a file, a name, a tensor, a flag) is wrong; the message says what to do."""

    exit_code = ExitCode.BAD_INPUT


class UnsafeFileError(BadInputError):
    """A pickle that needs arbitrary code to load; refused without running any of it."""


class LoadError(BadInputError):
    """A file that is not a loadable VAE: truncated, empty, wrong keys or shapes."""
