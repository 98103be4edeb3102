"""Whether a process is still there: how a stale lock or a dead writer's temporary file is told apart."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pid_alive", "process_start"]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # Field 22, counted after the parenthesised command name (which may hold spaces).
    rest = stat.rpartition(")")[2].split()
    return rest[19] if len(rest) > 19 else None
