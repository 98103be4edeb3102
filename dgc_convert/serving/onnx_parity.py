"""The parity check of an exported ONNX file: onnxruntime against PyTorch on random inputs.

``check_parity`` runs the file with onnxruntime (CPU) and the model with
PyTorch on the same random images, at every (height, width) and batch size
asked, and returns the largest absolute difference of each run and the
largest PyTorch output magnitude (the scale a relative tolerance applies
to). Whether the differences pass is the caller's call; what stops the
check from running at all (the model or the graph cannot take a size) is an
``ExportError`` in one line naming the size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dgc_convert.errors import ExportError
from dgc_convert.progress import NO_PROGRESS, Progress

__all__ = ["Parity", "check_parity", "one_line"]


def one_line(error: BaseException, limit: int = 300) -> str:
    """``error`` as ``Type: message`` on one line (onnxruntime spreads the useful part
    over several lines, e.g. which index got which size), at most ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:limit]


@dataclass
class Parity:
    """What the check measured: ``max_abs_diff`` maps (batch, height px, width px) to the largest
    |onnxruntime - PyTorch| of that run; ``scale`` is the largest |PyTorch output| over all runs,
    at least 1 (so a relative tolerance never shrinks below the absolute one)."""

    max_abs_diff: dict[tuple[int, int, int], float]
    scale: float


def check_parity(
    model: nn.Module,
    file: Path,
    *,
    channels: int,
    sizes: Sequence[tuple[int, int]],
    batches: Sequence[int],
    traced: tuple[int, int],
    pinned: Mapping[str, int],
    progress: Progress = NO_PROGRESS,
) -> Parity:
    """Run ``file`` with onnxruntime and ``model`` (eval mode) with PyTorch on the same random
    inputs (seeded: the same every call) of ``channels`` channels, at each of ``sizes``
    (height, width in pixels) and each batch size of ``batches``.

    ``traced`` is the size the graph was traced at; ``pinned`` names the
    sides ("height", "width") the exporter fixed although they were asked
    to be dynamic, with the pixels it fixed them at. ``progress`` gets one
    step, advanced once per run.

    Raises:
        ExportError: at some size, the model does not run in PyTorch, the graph
            fixed a side to another size, or onnxruntime cannot run the graph
            (one line naming the size and batch).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # Fatal only: a failed run's error is logged to stderr and raised too; we
    # report it once, in our own one-line message.
    options.log_severity_level = 4
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    diffs: dict[tuple[int, int, int], float] = {}
    scale = 1.0
    generator = torch.Generator().manual_seed(0)
    progress.step("checking onnxruntime against PyTorch", len(sizes) * len(batches))
    for height, width in sizes:
        for batch_size in batches:
            where = f"parity check at {height}x{width} (batch {batch_size})"
            x = torch.randn(batch_size, channels, height, width, generator=generator)
            expected = _run_in_pytorch(model, x, where, fixed_size_hint=(height, width) != traced)
            _check_pinned(pinned, height, width, where)
            try:
                got = torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])
            except Exception as error:  # onnxruntime raises its own error types
                raise ExportError(f"{where}: onnxruntime cannot run the exported graph ({one_line(error)})") from None
            scale = max(scale, float(expected.abs().max()))
            diffs[(batch_size, height, width)] = float((got - expected).abs().max())
            progress.advance()
    return Parity(diffs, scale)


def _run_in_pytorch(model: nn.Module, x: torch.Tensor, where: str, *, fixed_size_hint: bool) -> torch.Tensor:
    """The model's output on ``x``, or one line saying it cannot take this size."""
    try:
        with torch.no_grad():
            return model(x)
    except Exception as error:  # the model's own limit, e.g. a head over a fixed-size map
        hint = "; it needs a fixed input size: export without dynamic size" if fixed_size_hint else ""
        raise ExportError(
            f"{where}: the model does not run at this size in PyTorch ({one_line(error)}){hint}"
        ) from None


def _check_pinned(pinned: Mapping[str, int], height: int, width: int, where: str) -> None:
    """Refuse a size the graph cannot take because the exporter fixed one of its sides."""
    wrong = [f"{axis} {dim}" for axis, dim in pinned.items() if dim != {"height": height, "width": width}[axis]]
    if wrong:
        raise ExportError(
            f"{where}: the exported graph takes only {' and '.join(wrong)} px: the exporter fixed it "
            "because the model depends on the size (a size check or branch); export without dynamic size"
        )
