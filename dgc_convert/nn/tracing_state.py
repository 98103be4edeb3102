"""Whether a tracer is recording the model right now, which decides the graph form."""

from __future__ import annotations

import torch

__all__ = ["jit_tracing", "exporting"]


def jit_tracing() -> bool:
    """True inside ``torch.jit.trace`` (torch leaves ``is_tracing`` unannotated)."""
    tracing: bool = torch.jit.is_tracing()  # type: ignore[no-untyped-call]
    return tracing


def exporting() -> bool:
    """True while torch.export, torch.onnx or torch.jit.trace trace the model: eval then
    takes the graph form (one computation, no timing or caches that would differ between traces)."""
    compiler = getattr(torch, "compiler", None)
    return bool(getattr(compiler, "is_exporting", lambda: False)() or torch.onnx.is_in_onnx_export() or jit_tracing())
