"""How much memory a run may use, asked before it allocates: a size that cannot fit is
refused in one line instead of growing until the kernel kills the process."""

from __future__ import annotations

import torch

from dgc_convert.errors import SettingsError

__all__ = ["available_memory", "gib", "require_memory"]


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes available to start new work on ``device``: Linux ``MemAvailable`` for the CPU;
    for a CUDA device its free memory plus what PyTorch holds cached but unused. None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free = int(torch.cuda.mem_get_info(device)[0])
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        except RuntimeError:
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def gib(size: float) -> str:
    """``size`` bytes as GiB for a message, e.g. ``"12.3 GiB"``."""
    return f"{size / 2**30:.1f} GiB"


def require_memory(need: int, available: int | None, *, doing: str, advice: str) -> None:
    """Refuse, in one line, work whose activations (``need`` bytes) exceed ``available`` bytes (None: unknown, allowed).

    The message reads ``"{doing} {need} of activations and {available} is available; {advice}"``.

    Raises:
        SettingsError: ``need`` is more than ``available``.
    """
    if available is not None and need > available:
        raise SettingsError(f"{doing} {gib(need)} of activations and {gib(available)} is available; {advice}")
