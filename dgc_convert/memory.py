"""How much memory a run may use, asked before it allocates: a size that cannot fit is
refused in one line instead of growing until the kernel kills the process."""

from __future__ import annotations

import torch

__all__ = ["available_memory", "gib"]


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes available to start new work on ``device``: Linux ``MemAvailable`` for the CPU,
    the free memory of a CUDA device; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
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
