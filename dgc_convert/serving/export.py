"""ONNX export with the dynamic gating kept, checked with onnxruntime.

Every DGC layer exports as its graph-friendly computation: the saliency
generator, TopK over the scores, ScatterElements into per-head gates (under
network gating, DGC-G: Greater against the threshold, ArgMax for each head's
top channel, Where) and one grouped Conv over the heads' gated copies, whose output is already in dense
order (layers from older files with interleaved heads add the channel
shuffle as one Gather). The batch dimension stays dynamic; with
``dynamic_size`` the height and width do too. After export the file is run
with onnxruntime on random inputs of batch 1 and 4 (at two image sizes with
``dynamic_size``) and compared with PyTorch. The file is written to a temporary
file next to the target and renamed into place only when the export and the
parity check both passed: a failed export, parity check or write keeps an
existing file at the target as it was.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgc_convert.conversion.zoo import model_info
from dgc_convert.errors import ExportError
from dgc_convert.files.atomic import move_into_place, temporary_beside
from dgc_convert.nn.conv_kinds import conv_kind
from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.nn.modes import dgc_mode
from dgc_convert.progress import NO_PROGRESS, Progress
from dgc_convert.serving.onnx_parity import check_parity, one_line

__all__ = [
    "ExportReport",
    "check_export_options",
    "export_onnx",
    "second_check_size",
    "supported_opsets",
    "ExportError",
]


# The operators that carry the per-sample choice of channels: TopK and the
# scatter/gathers head-wise, ArgMax (each head's top channel) under network
# gating. (Greater and Where appear in both, in the tie-breaking keys too.)
_GATING_OPS = ("TopK", "ScatterElements", "Gather", "GatherElements", "ArgMax")

# The total stride of ResNets, MobileNets, EfficientNets and most timm CNNs:
# an image side that is a multiple of it reaches every stage as a whole-pixel map.
_SIZE_MULTIPLE = 32

# Terminal colour codes, which torch.onnx puts in its error messages.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

# The lowest opset the export supports: the gating's TopK, ScatterElements and
# GatherElements need their opset-13 forms.
MIN_OPSET = 13
# The highest opset when torch.onnx does not say its own (it is a private constant there).
_FALLBACK_MAX_OPSET = 18

_INPUT_NAME = "input"
_OUTPUT_NAME = "output"

Shape = tuple[int | str, ...]  # an ONNX tensor shape: ints are fixed, strings named dynamic dimensions


@dataclass
class ExportReport:
    """Where the model went, its ONNX signature, which operators carry the gating, and the parity check.

    ``export_onnx`` returns one for every export that ran to the end, whether
    the parity check passed (``written``: the file is at ``path``) or not (an
    existing file at ``path`` was kept); what the CLI's export command prints.
    """

    path: Path
    opset: int
    gating_ops: dict[str, int]
    max_abs_diff: dict[tuple[int, int, int], float]  # (batch, height px, width px) -> max |onnxruntime - torch|
    tolerance: float  # absolute: the relative tolerance times the output scale
    input_name: str
    input_shape: Shape  # e.g. ("batch", 3, "height", "width") with dynamic size, ("batch", 3, 224, 224) without
    output_name: str
    output_shape: Shape
    written: bool = False  # True when the file is at ``path``: the export and the parity check both passed

    @property
    def passed(self) -> bool:
        """True when every checked (batch, size) is within tolerance."""
        return all(diff <= self.tolerance for diff in self.max_abs_diff.values())

    @property
    def dynamic_size(self) -> bool:
        """True when the graph's input height and width are symbolic (any size), not fixed ints."""
        return len(self.input_shape) == 4 and all(isinstance(dim, str) for dim in self.input_shape[2:])

    @property
    def checked_sizes(self) -> list[tuple[int, int]]:
        """The (height, width) sizes in pixels the parity check ran at, in order."""
        return list(dict.fromkeys((height, width) for _, height, width in self.max_abs_diff))

    def diffs_by_size(self) -> list[str]:
        """One text per checked size, e.g. ``"32x32: batch 1 5.2e-08, batch 4 1.0e-07"``."""
        return [
            f"{height}x{width}: "
            + ", ".join(f"batch {b} {d:.1e}" for (b, h, w), d in self.max_abs_diff.items() if (h, w) == (height, width))
            for height, width in self.checked_sizes
        ]


def supported_opsets() -> tuple[int, int]:
    """(lowest, highest) ONNX opset the installed exporter supports, e.g. (13, 23).

    The highest is torch.onnx's own limit, capped at the installed onnx
    package's newest opset.
    """
    highest = _FALLBACK_MAX_OPSET
    try:
        from torch.onnx import _constants

        highest = int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    try:
        import onnx

        highest = min(highest, int(onnx.defs.onnx_opset_version()))
    except ImportError:
        pass
    return MIN_OPSET, max(highest, MIN_OPSET)


def check_export_options(opset: int, tolerance: float) -> None:
    """Refuse an ``opset`` outside ``supported_opsets()`` or a ``tolerance`` that is not a finite number above 0.

    Raises:
        ExportError: one line naming the value and what is allowed.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ExportError(f"tolerance must be a finite number above 0, got {tolerance}")
    lowest, highest = supported_opsets()
    if not lowest <= opset <= highest:
        raise ExportError(
            f"opset {opset} is not supported: the installed exporter (torch {torch.__version__}) "
            f"supports opsets {lowest} to {highest}"
        )


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ExportError(f"ONNX export needs {module}: pip install 'dgc-convert[export]'") from None


@contextlib.contextmanager
def _quiet_loggers(*roots: str) -> Iterator[None]:
    """Silence the loggers named ``roots`` and their children (below CRITICAL) for the block.

    Each existing logger's own level is set and restored, since torch gives
    some of its loggers their own levels; children created meanwhile inherit it.
    """
    loggers = [logging.getLogger(root) for root in roots] + [
        logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and name.split(".")[0] in roots
    ]
    levels = [(logger, logger.level) for logger in dict.fromkeys(loggers)]
    for logger, _ in levels:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in levels:
            logger.setLevel(level)


def second_check_size(height: int, width: int) -> tuple[int, int]:
    """The second image size (height, width in pixels) the dynamic-size parity check runs at:
    each side 1.5x, rounded up to a multiple of 32 (the total stride of ResNets, MobileNets
    and most CNN classifiers, so every stage sees a whole-pixel map), e.g. 224 -> 352, 32 -> 64.
    Larger, not smaller: a smaller image could fall below what the model's downsampling allows."""

    def scaled(side: int) -> int:
        return _SIZE_MULTIPLE * math.ceil(1.5 * side / _SIZE_MULTIPLE)

    return scaled(height), scaled(width)


def _pads_by_size(model: nn.Module) -> bool:
    """True when some layer's padding depends on the input size (TF-'SAME', dense or DGC)."""
    for module in model.modules():
        if isinstance(module, DGCConv2d) and module.same_padding:
            return True
        if isinstance(module, nn.Conv2d):
            kind = conv_kind(module)
            if kind is not None and kind.same_padding:
                return True
    return False


def _shape(value: object) -> Shape:
    """The dims of an ONNX graph input/output (``ValueInfoProto``): named dims as str, fixed as int."""
    dims = value.type.tensor_type.shape.dim  # type: ignore[attr-defined]
    return tuple(dim.dim_param or dim.dim_value for dim in dims)


@dataclass(frozen=True)
class _Plan:
    """One export's settled arguments: the target, the traced size, the parity check's sizes and
    batches (sizes in pixels, (height, width))."""

    path: Path
    channels: int
    traced: tuple[int, int]
    sizes: list[tuple[int, int]]
    batches: tuple[int, ...]
    opset: int
    tolerance: float
    dynamic_size: bool


@dataclass(frozen=True)
class _Graph:
    """What the exported file says about itself: gating operators by count, and its signature."""

    gating_ops: dict[str, int]
    input_name: str
    input_shape: Shape
    output_name: str
    output_shape: Shape

    def pinned(self, dynamic_size: bool) -> dict[str, int]:
        """The sides asked to be dynamic that the graph fixed anyway ("height"/"width" -> pixels).

        torch.onnx refines the requested dynamic dims from torch.export's
        suggested fixes instead of failing: a size check or a size-dependent
        branch in the model silently fixes them. The parity check reports
        the first size the fixed graph cannot take.
        """
        if not dynamic_size:
            return {}
        return {axis: dim for axis, dim in zip(("height", "width"), self.input_shape[2:]) if isinstance(dim, int)}


def _plan(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: tuple[int, int, int] | None,
    opset: int,
    tolerance: float,
    check_batches: tuple[int, ...],
    dynamic_size: bool,
    check_sizes: Sequence[tuple[int, int]] | None,
) -> _Plan:
    """Check the arguments and the export packages, and settle the sizes (see ``export_onnx``).

    Raises:
        ExportError: a bad opset or tolerance, a missing package, or a check size
            other than the export size without ``dynamic_size``.
    """
    check_export_options(opset, tolerance)
    for module in ("onnx", "onnxscript", "onnxruntime"):
        _require(module)
    info = model_info(model)
    size = tuple(input_size or (info.input_size if info else (3, 224, 224)))
    traced = (int(size[1]), int(size[2]))
    if check_sizes is None:
        sizes = [traced, second_check_size(*traced)] if dynamic_size else [traced]
        if dynamic_size and _pads_by_size(model):
            # TF-'SAME' padding differs between even and odd sides, and both sizes above are even.
            sizes.append((sizes[1][0] + 1, sizes[1][1] + 1))
    else:
        sizes = list(dict.fromkeys((int(h), int(w)) for h, w in check_sizes))
        if not dynamic_size and any(s != traced for s in sizes):
            other = next(s for s in sizes if s != traced)
            raise ExportError(
                f"check size {other[0]}x{other[1]} differs from the export size {traced[0]}x{traced[1]}: "
                "a fixed-size graph takes only that size (export with dynamic size)"
            )
    return _Plan(Path(path), int(size[0]), traced, sizes, tuple(check_batches), opset, tolerance, dynamic_size)


def _require_runs(model: nn.Module, example: torch.Tensor, traced: tuple[int, int]) -> None:
    """Run ``model`` once at the export size: a model that cannot fails the export with
    torch.export's symbolic-shape terms, and PyTorch's own error is clearer.

    Raises:
        ExportError: one line with PyTorch's error.
    """
    try:
        with torch.no_grad():
            model(example)
    except Exception as error:
        raise ExportError(
            f"the model does not run at the export size {traced[0]}x{traced[1]} in PyTorch ({one_line(error)})"
        ) from None


def _export_program(model: nn.Module, example: torch.Tensor, plan: _Plan) -> Any:
    """Trace ``model`` (DGC layers in their export form) into an ONNX program, quietly.

    Returns:
        torch.onnx's ``ONNXProgram`` (``save(file)`` writes it).

    Raises:
        ExportError: the export failed (one line: the innermost cause).
    """
    axes: dict[int, torch.export.Dim] = {0: torch.export.Dim("batch", min=1, max=1024)}
    if plan.dynamic_size:
        # No upper bound: the exporter only records the names; the parity
        # check is what shows the graph really takes another size.
        axes[2] = torch.export.Dim("height", min=1)
        axes[3] = torch.export.Dim("width", min=1)
    try:
        # The exporter prints its progress on stdout, and a failing trace logs
        # dozens of lines (guards, stacks) on stderr; our output is the report.
        with (
            dgc_mode(model, algorithm="export"),
            contextlib.redirect_stdout(io.StringIO()),
            warnings.catch_warnings(),
            _quiet_loggers("torch", "onnxscript"),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=plan.opset,
                input_names=[_INPUT_NAME],
                output_names=[_OUTPUT_NAME],
                dynamic_shapes=(axes,),
                verbose=False,
            )
    except Exception as error:  # the exporter fails in many ways; one line for the user
        # torch.onnx wraps the cause in a generic "Failed to export ... step 1/3"
        # (with terminal colours); the innermost error says what went wrong.
        cause: BaseException = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        traced = plan.traced
        what = f" with dynamic height and width (traced at {traced[0]}x{traced[1]})" if plan.dynamic_size else ""
        raise ExportError(f"ONNX export{what} failed: {_ANSI_ESCAPE.sub('', one_line(cause))}") from None
    if program is None:  # an older torch.onnx that returns nothing without a file to write
        raise ExportError("ONNX export failed: torch.onnx.export returned no ONNX program")
    return program


def _read_graph(file: Path) -> _Graph:
    """The gating operators and the signature of the ONNX file ``file``."""
    import onnx

    graph = onnx.load(str(file)).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in _GATING_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return _Graph(counts, graph.input[0].name, _shape(graph.input[0]), graph.output[0].name, _shape(graph.output[0]))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: tuple[int, int, int] | None = None,
    opset: int = 18,
    tolerance: float = 1e-4,
    check_batches: tuple[int, ...] = (1, 4),
    dynamic_size: bool = False,
    check_sizes: Sequence[tuple[int, int]] | None = None,
    progress: Progress = NO_PROGRESS,
) -> ExportReport:
    """Export ``model`` (eval mode) to ONNX at ``path`` and check it against PyTorch with onnxruntime.

    The graph has one input ``"input"`` (batch, channels, height, width) and one
    output ``"output"``; the batch dimension is always dynamic (``"batch"``).

    Args:
        input_size: (channels, height, width), height and width in pixels; the
            model's recorded input size by default. The export traces at this size.
        tolerance: largest allowed max absolute difference, relative to the
            largest PyTorch output magnitude over all checks (at least 1).
        check_batches: the batch sizes of the parity check, at every checked size.
        dynamic_size: also make height and width dynamic (``"height"``,
            ``"width"``); without it they stay fixed at ``input_size``.
        check_sizes: the (height, width) sizes in pixels of the parity check.
            By default ``input_size``'s, and with ``dynamic_size`` also
            ``second_check_size`` of it (1.5x, rounded up to a multiple of 32)
            and, for a model with TF-'SAME' padding, one pixel more than that
            (an odd side pads differently).
            Without ``dynamic_size`` only ``input_size``'s is allowed.
        progress: told each step, and each parity check (see ``dgc_convert.progress``).

    Returns:
        An ``ExportReport``, whether the parity check passed or not: the file is
        written only when the export and the parity check both passed
        (``report.written``); otherwise an existing file at ``path`` is kept as
        it was, and so it is when writing fails (e.g. a full disk: the
        ``OSError`` propagates).

    Raises:
        ExportError: an unsupported ``opset`` or a ``tolerance`` that is not
            a finite number above 0 (before any export work), a missing export
            dependency, an export that fails, or a parity check that cannot
            run (e.g. a model whose head needs a fixed size, at a second size);
            the one-line message names the size.
    """
    plan = _plan(
        model,
        path,
        input_size=input_size,
        opset=opset,
        tolerance=tolerance,
        check_batches=check_batches,
        dynamic_size=dynamic_size,
        check_sizes=check_sizes,
    )
    model = model.eval()
    example = torch.randn(2, plan.channels, *plan.traced)
    progress.step(f"running the model in PyTorch at {plan.traced[0]}x{plan.traced[1]}")
    _require_runs(model, example, plan.traced)
    progress.step(f"exporting to ONNX (opset {opset}{', dynamic height and width' if dynamic_size else ''})")
    program = _export_program(model, example, plan)
    # Written next to ``path`` and moved over it only when the parity check passed:
    # a failed check, a failure or an interruption keeps an existing file as it was.
    with temporary_beside(plan.path) as temporary:
        progress.step("writing the graph and loading it into onnxruntime")
        program.save(str(temporary), external_data=False)
        graph = _read_graph(temporary)
        parity = check_parity(
            model,
            temporary,
            channels=plan.channels,
            sizes=plan.sizes,
            batches=plan.batches,
            traced=plan.traced,
            pinned=graph.pinned(plan.dynamic_size),
            progress=progress,
        )
        report = ExportReport(
            plan.path,
            plan.opset,
            graph.gating_ops,
            parity.max_abs_diff,
            plan.tolerance * parity.scale,
            graph.input_name,
            graph.input_shape,
            graph.output_name,
            graph.output_shape,
        )
        if report.passed:
            move_into_place(temporary, plan.path)
            report.written = True
    return report
