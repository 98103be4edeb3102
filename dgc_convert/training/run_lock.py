"""One training run per output directory: a lock file held for the run's whole life.

``OUTPUT/.lock`` is created exclusively (``O_CREAT | O_EXCL``) and holds
``{"pid", "host", "started"}`` (plus the holder's process start time where the
system tells it, so a reused pid is not mistaken for the holder). A second run
into the same directory is refused with ``RunLockedError`` naming the holder,
before it writes anything. A lock whose holder is gone (same host, pid not
running) is stale: it is taken over, with one line saying so. The lock is
removed when the run ends, however it ends (a SIGKILL leaves a stale lock,
which the next run takes over).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dgc_convert.errors import DGCConvertError
from dgc_convert.files.atomic import make_directory
from dgc_convert.files.names import LOCK_FILE
from dgc_convert.files.processes import pid_alive, process_start

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "pid_alive", "run_lock"]


class RunLockedError(DGCConvertError):
    """Another run (alive) is training into the same output directory."""


class RunLock:
    """The lock on one output directory; ``acquire`` then ``release`` (or use ``run_lock``)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.content: str | None = None
        self.created = False  # acquire made the directory: release removes it if the run left it empty

    def acquire(self, notify: Callable[[str], None] | None = None) -> RunLock:
        """Take the lock (creating the directory if needed); take over a stale one, saying so via ``notify``.

        Raises:
            RunLockedError: a live run holds it (one line: pid, host, start time).
        """
        self.created = not self.directory.is_dir()
        make_directory(self.directory)
        pid = os.getpid()
        record = {
            "pid": pid,
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "process_start": process_start(pid),
        }
        content = json.dumps(record)
        for _ in range(5):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # less the umask
            except FileExistsError:
                holder, seen = self._holder()
                if holder is None:
                    continue  # released meanwhile: try again
                reason = self._stale(holder)
                if reason is None:
                    raise RunLockedError(self._refusal(holder)) from None
                # Remove it only if it is still the stale lock just read (another run may have taken it over).
                if self._read() != seen:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                if notify is not None:
                    notify(f"{self.path}: taking over a stale lock ({reason})")
                continue
            try:
                os.write(handle, content.encode("utf-8"))
                os.fsync(handle)
            finally:
                os.close(handle)
            self.content = content
            return self
        raise RunLockedError(f"{self.path}: could not take the run lock (other runs keep taking it)")

    def release(self) -> None:
        """Remove the lock if this process still holds it, and the directory if ``acquire``
        created it and the run wrote nothing (refused before it started)."""
        if self.content is not None and self._read() == self.content:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            if self.created:
                with contextlib.suppress(OSError):  # not empty: the run's files stay
                    self.directory.rmdir()
        self.content = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _read(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def _holder(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lock's record and raw text; a record still being written gets a moment to appear."""
        seen = None
        for _ in range(20):
            seen = self._read()
            if seen is None:
                return None, None
            try:
                holder = json.loads(seen)
            except json.JSONDecodeError:
                holder = None
            if isinstance(holder, dict):
                return holder, seen
            time.sleep(0.05)
        return {}, seen  # still unreadable: left by a run that died while writing it

    @staticmethod
    def _stale(holder: dict[str, Any]) -> str | None:
        """Why ``holder`` is gone (None while it may be alive)."""
        pid = holder.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            return "unreadable lock file"
        if holder.get("host") != socket.gethostname():
            return None  # another host: no way to tell, so never steal it
        if not pid_alive(pid):
            return f"pid {pid} on {holder.get('host')} is no longer running"
        recorded = holder.get("process_start")
        if recorded is not None and process_start(pid) not in (None, recorded):
            return f"pid {pid} on {holder.get('host')} is now another process"
        return None

    def _refusal(self, holder: dict[str, Any]) -> str:
        host = holder.get("host")
        message = (
            f"{self.directory}: another run is training into this directory "
            f"(pid {holder.get('pid')} on {host}, started {holder.get('started')}); "
            "wait for it to finish or choose another output.directory"
        )
        if host != socket.gethostname():
            message += f" (if that run is gone, delete {self.path})"
        return message


@contextlib.contextmanager
def run_lock(
    directory: str | Path, *, enabled: bool = True, notify: Callable[[str], None] | None = None
) -> Iterator[RunLock | None]:
    """Hold the run lock on ``directory`` for the block (nothing when not ``enabled``: non-zero ranks)."""
    if not enabled:
        yield None
        return
    lock = RunLock(directory).acquire(notify)
    try:
        yield lock
    finally:
        lock.release()
