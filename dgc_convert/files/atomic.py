"""Atomic file writes: a temporary file in the target's directory, renamed over it once complete.

Readers see the old file or the new one, never a part of one; a write that
fails (a full disk, an error in the writer, Ctrl-C) leaves the old file as it
was and no temporary file behind. The new file gets the usual permissions,
0666 less the process umask (0644 by default), not the 0600 that
``tempfile.mkstemp`` or some writers (safetensors) give.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from dgc_convert.files.processes import pid_alive

__all__ = [
    "atomic_write",
    "give_default_mode",
    "make_directory",
    "move_into_place",
    "naming_os_errors",
    "temporary_beside",
]


def give_default_mode(*paths: Path) -> None:
    """Give files written by a library that narrows permissions (safetensors: 0600) the
    usual mode, 0666 less the process umask, as ``atomic_write`` does."""
    mask = os.umask(0)  # the only way to read the umask: set it and put it back at once
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def make_directory(path: str | Path) -> Path:
    """Create the directory ``path`` and its parents (nothing if it exists); returns it.

    Raises:
        NotADirectoryError: a file stands where ``path`` or one of its parents
            should be; it names that file (``mkdir`` alone says "File exists").
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the path itself, or a parent, is a file
        in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise NotADirectoryError(errno.ENOTDIR, "a file, where a directory is needed", str(in_the_way)) from None
    return path


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write to; on a clean exit it replaces ``path``.

    The temporary file exists (empty) when the block starts, so a writer may
    open it or overwrite it by name. On a clean exit the file is given the
    mode ``0o666 & ~umask``, flushed to disk and renamed over ``path``; when
    the block raises, it is removed and ``path`` is left untouched. The
    target's directory is created if missing. The temporary file is named
    ``.NAME.PID-TOKEN.tmp``: one left by a process killed while writing
    ``path`` (nothing can remove it then) is removed by the next write to
    ``path`` once that process is gone.
    """
    with temporary_beside(path) as temporary:
        yield temporary
        move_into_place(temporary, path)


@contextlib.contextmanager
def temporary_beside(path: str | Path) -> Iterator[Path]:
    """Yield a new, empty temporary file next to ``path``, removed when the block ends unless
    ``move_into_place`` renamed it over ``path`` inside the block.

    For a writer that decides only after writing whether the file should
    replace ``path`` (``atomic_write`` always does on a clean exit). Being
    in the target's directory, the rename is atomic. An ``OSError`` inside
    the block names ``path`` (``naming_os_errors``); the temporary file's
    name and the sweep of dead processes' ones are ``atomic_write``'s.
    """
    path = Path(path)
    make_directory(path.parent)
    _sweep_temporaries(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:  # name the file asked for, not our hidden temporary one
        raise OSError(error.errno, error.strerror, str(path)) from None
    try:
        with naming_os_errors(path):
            yield temporary
    finally:
        # Gone already when it was moved into place; otherwise nothing may be left behind.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def move_into_place(temporary: Path, path: str | Path) -> None:
    """Rename a complete ``temporary`` (from ``temporary_beside(path)``) over ``path``: given the
    mode ``0o666 & ~umask`` and flushed to disk first, the directory flushed after (best effort)."""
    path = Path(path)
    give_default_mode(temporary)  # after writing: a writer that recreates the file may narrow it
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _sweep_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of earlier writes to ``path`` whose process is gone (this host's pids)."""

    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?P<pid>\d+)-[0-9a-f]{{8}}\.tmp$")
    removed = []
    with contextlib.suppress(OSError):  # tidying up must never fail the write itself
        for entry in path.parent.iterdir():
            match = pattern.match(entry.name)
            if match is not None and not pid_alive(int(match["pid"])) and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


@contextlib.contextmanager
def naming_os_errors(path: str | Path) -> Iterator[None]:
    """Make a write the OS refused an ``OSError`` that names ``path``.

    A writer's own ``write()`` failing (a full disk) raises an ``OSError``
    with no file name, and safetensors reports it as ``SafetensorError("...
    I/O error: No space left on device (os error 28)")``: both are re-raised
    as ``OSError(errno, strerror, path)``, which the CLI turns into one line.
    """
    from safetensors import SafetensorError

    try:
        yield
    except OSError as error:
        if error.errno is None or error.filename:
            raise
        raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from error
    except SafetensorError as error:
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from None


def _fsync_directory(directory: Path) -> None:
    """Flush the rename to disk where the platform allows (best effort: not on Windows)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
