"""The exception types and exit codes shared by the API, the CLI and the server."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the ``vaekit`` command."""

    OK = 0
    FAILURE = 1
    BAD_INPUT = 2
    INTERRUPTED = 130  # Ctrl-C, as shells report a process ended by SIGINT


class VaekitError(Exception):
    """A failure with a one-line message meant for the user."""

    exit_code = ExitCode.FAILURE


class BadInputError(VaekitError):
    """The user's input (a file, a name, a tensor, a flag) is wrong; the message says what to do."""

    exit_code = ExitCode.BAD_INPUT


class LoadError(BadInputError):
    """A file that is not a loadable VAE: truncated, empty, wrong keys or shapes."""


class UnsafeFileError(LoadError):
    """A pickle that needs arbitrary code to load; refused without running any of it.

    A kind of :class:`LoadError`: whoever skips unreadable files (the library scan) skips these too.
    """


_ANSI = r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]"  # compiled on first use: `re` is not imported at start-up
_CONTROL = r"[\x00-\x1f\x7f]+"


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` as one clean line: ANSI colour codes and control characters gone, whitespace runs collapsed,
    optionally cut at ``limit`` characters on a word boundary (marked with an ellipsis)."""
    import re

    text = re.sub(_CONTROL, " ", re.sub(_ANSI, "", text))
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
        text = cut.rstrip(",;:") + "..."
    return text


def reason(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), cleaned by :func:`one_line`."""
    import re

    lines = [line for line in re.sub(_ANSI, "", str(e)).strip().splitlines() if line.strip()]
    return one_line(lines[0] if lines else type(e).__name__, limit)
