"""ONNX export with the dynamic gating kept, checked with onnxruntime.

Every DGC layer exports as its graph-friendly computation: the saliency
generator, TopK over the scores, ScatterElements into per-head gates (under
network gating, DGC-G: Greater against the threshold, ArgMax for each head's
top channel, Where) and one grouped Conv over the heads' gated copies, whose output is already in dense
order (layers from older files with interleaved heads add the channel
shuffle as Reshape/Transpose). The batch dimension stays dynamic. After export the
file is run with onnxruntime on random inputs of batch 1 and 4 and compared
with PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dgc_convert.errors import ExportError
from dgc_convert.nn.modes import dgc_mode
from dgc_convert.zoo import model_info

__all__ = ["ExportReport", "export_onnx", "ExportError"]


# The operators that carry the per-sample choice of channels: TopK and the
# scatter/gathers head-wise, ArgMax (each head's top channel) under network
# gating. (Greater and Where appear in both, in the tie-breaking keys too.)
_GATING_OPS = ("TopK", "ScatterElements", "Gather", "GatherElements", "ArgMax")


@dataclass
class ExportReport:
    """Where the model went, which ONNX operators carry the gating, and the parity check."""

    path: Path
    opset: int
    gating_ops: dict[str, int]
    max_abs_diff: dict[int, float]  # batch size -> max |onnxruntime - torch|
    tolerance: float

    @property
    def passed(self) -> bool:
        """True when every checked batch is within tolerance."""
        return all(diff <= self.tolerance for diff in self.max_abs_diff.values())


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ExportError(f"ONNX export needs {module}: pip install 'dgc-convert[export]'") from None


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: tuple[int, int, int] | None = None,
    opset: int = 18,
    tolerance: float = 1e-4,
    check_batches: tuple[int, ...] = (1, 4),
) -> ExportReport:
    """Export ``model`` (eval mode) to ONNX at ``path`` and check it against PyTorch with onnxruntime.

    Args:
        input_size: (channels, height, width); the model's recorded input size by default.
        tolerance: largest allowed max absolute difference, relative to the
            largest PyTorch output magnitude (at least 1).

    Raises:
        ExportError: a missing export dependency, or an export that fails.
    """
    for module in ("onnx", "onnxscript", "onnxruntime"):
        _require(module)
    import onnx
    import onnxruntime

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = model_info(model)
    size = tuple(input_size or (info.input_size if info else (3, 224, 224)))
    model = model.eval()
    example = torch.randn(2, *size)
    try:
        batch = torch.export.Dim("batch", min=1, max=1024)
        # The exporter prints its progress on stdout; our output is the report.
        with dgc_mode(model, algorithm="export"), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
    except Exception as error:  # the exporter fails in many ways; one line for the user
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}") from None
    graph = onnx.load(str(path)).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in _GATING_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    diffs: dict[int, float] = {}
    scale = 1.0
    generator = torch.Generator().manual_seed(0)
    for batch_size in check_batches:
        x = torch.randn(batch_size, *size, generator=generator)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])
        scale = max(scale, float(expected.abs().max()))
        diffs[batch_size] = float((got - expected).abs().max())
    return ExportReport(path, opset, counts, diffs, tolerance * scale)
