"""How a command ends: the exit codes, and bad input as one line on stderr instead of a traceback.

Every command is wrapped in ``handles_errors``; a command that finds bad input itself calls
``fail``. Imports no torch: the app and every command module import this at start-up.
"""

from __future__ import annotations

import errno
import functools
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer

from dgc_convert.display import error_console
from dgc_convert.errors import DGCConvertError, TrainingDiverged

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_RUN_FAILED",
    "EXIT_INTERRUPTED",
    "fail",
    "handles_errors",
    "os_error_exit",
    "require_png",
]

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
# The OS refusing a path the user gave is bad input; any other OSError (a disk
# that fills up or fails, out of memory or file handles) is the run failing.
_BAD_PATH = (
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
    errno.ELOOP,
)

Command = TypeVar("Command", bound=Callable[..., Any])


class _CommandFailed(Exception):
    """A command's one-line failure, printed by ``handles_errors`` once the command's progress
    line is gone (printed while it is shown, the line would be erased with it)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """End the command with ``error: MESSAGE`` on stderr and exit ``code`` (bad input unless told otherwise)."""
    raise _CommandFailed(message, code)


def _print_failure(message: str, code: int) -> NoReturn:
    from rich.markup import escape  # a message's own brackets (pip install "x[extra]") are text, not markup

    error_console().print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(code)


def _internal_error(error: BaseException) -> NoReturn:
    """A bug, not bad input: one line, the full traceback in a file, exit 1."""
    with tempfile.NamedTemporaryFile("w", prefix="dgc-convert-error-", suffix=".txt", delete=False) as handle:
        handle.write("".join(traceback.format_exception(error)))
    first = str(error).splitlines()[0] if str(error) else ""
    _print_failure(
        f"internal error ({type(error).__name__}: {first[:200]}); traceback written to {handle.name}", EXIT_RUN_FAILED
    )


def os_error_exit(error: OSError) -> int:
    """The exit code for an OSError: a path the user gave that cannot be written or read (read-only,
    missing, a file in the way) is bad input (2); anything else, a full disk first, is the run failing (1)."""
    return EXIT_BAD_INPUT if error.errno in _BAD_PATH else EXIT_RUN_FAILED


def _os_error_text(error: OSError) -> str:
    """``PATH: what the OS said`` (just the latter when no path is known)."""
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


def handles_errors(command: Command) -> Command:
    """Wrap a command so the project's own errors become one line on stderr and exit 2 (a diverged
    run exits 1); anything else is an internal error (exit 1, traceback in a file)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own exits and usage errors
            raise
        except _CommandFailed as failure:
            _print_failure(failure.message, failure.code)
        except TrainingDiverged as error:
            _print_failure(str(error), EXIT_RUN_FAILED)
        except DGCConvertError as error:
            _print_failure(str(error), EXIT_BAD_INPUT)
        except OSError as error:  # a path the user gave (unwritable, missing: 2), or a full disk (1)
            _print_failure(_os_error_text(error), os_error_exit(error))
        except KeyboardInterrupt:
            _print_failure("interrupted", EXIT_INTERRUPTED)
        except Exception as error:
            _internal_error(error)

    return wrapper  # type: ignore[return-value]


def require_png(path: Path | None, option: str) -> None:
    """Fail unless ``path`` (the value of ``option``) names a PNG: pictures are PNGs, and another
    suffix would name a file holding something else."""
    if path is not None and path.suffix.lower() != ".png":
        fail(f"{option} {path}: must name a .png file")
