"""How much memory a run may use, asked before it allocates: a size that cannot fit is
refused in one line instead of growing until the kernel kills the process."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dgc_convert.errors import SettingsError

if TYPE_CHECKING:
    from dgc_convert.measuring.macs import MacReport

__all__ = ["available_memory", "gib", "require_batch_memory", "require_memory"]


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


def require_memory(need: int, available: int | None, *, doing: str, advice: str, held: str = "activations") -> None:
    """Refuse, in one line, work that would hold ``need`` bytes when ``available`` bytes are
    available (None: unknown, allowed).

    The message reads ``"{doing} {need} of {held} and {available} is available; {advice}"``.

    Raises:
        SettingsError: ``need`` is more than ``available``.
    """
    if available is not None and need > available:
        raise SettingsError(f"{doing} {gib(need)} of {held} and {gib(available)} is available; {advice}")


def require_batch_memory(report: MacReport, batch_size: int, *, what: str, device: torch.device | str = "cpu") -> None:
    """Refuse, in one line, forwards without gradients of ``batch_size`` samples of ``report``'s
    model and input size (``MacReport.forward_memory``) that would not fit on ``device``; ``what``
    names the work in the message (e.g. ``"evaluating"``).

    Raises:
        SettingsError: they would not fit.
    """
    _, height, width = report.input_size
    require_memory(
        report.forward_memory(batch_size),
        available_memory(device),
        doing=f"{what} in batches of {batch_size} at {height}x{width} would hold about",
        advice="lower the batch size (--batch-size)",
    )
