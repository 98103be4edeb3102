"""Which computation serves a DGC layer's eval forward: chosen once per case.

A case is what the choice depends on: the input's device and dtype, the
weight's dtype, the TF-'SAME' padding at the input's size (only the op
refuses asymmetric padding) and whether the compiled op is paused on this
thread. The first eval call of a case chooses (``inference_algorithm``,
then whether the compiled op can run); later calls look the case up. Setting
``inference_algorithm`` forgets the choices. While exporting or tracing the
graph form is taken, and while ``torch.compile`` traces the choice is made
afresh and not remembered (tracing must not change state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dgc_convert.nn import compiled
from dgc_convert.nn.inference.base import InferenceComputation
from dgc_convert.nn.inference.compiled_op import CompiledOpComputation
from dgc_convert.nn.inference.export_graph import ExportGraphComputation
from dgc_convert.nn.inference.gathered import GatheredComputation
from dgc_convert.nn.inference.masked import MaskedComputation
from dgc_convert.nn.tracing_state import exporting

if TYPE_CHECKING:
    from dgc_convert.nn.layer import DGCConv2d

__all__ = ["InferencePlan"]


class InferencePlan:
    """One layer's eval computations (each made on first use, with its caches) and the
    computation chosen for each case met so far."""

    def __init__(self) -> None:
        self._compiled_op: CompiledOpComputation | None = None
        self._export = ExportGraphComputation()
        self._masked = MaskedComputation()
        self._gathered: dict[str, GatheredComputation] = {}
        self._chosen: dict[tuple[object, ...], InferenceComputation] = {}

    @property
    def compiled_op(self) -> CompiledOpComputation:
        """The compiled-op computation (its packed weight is the layer's ``compiled_weight``)."""
        if self._compiled_op is None:
            self._compiled_op = CompiledOpComputation()
        return self._compiled_op

    def gathered(self, algorithm: str) -> GatheredComputation:
        """The sparse computation by ``algorithm`` ("auto" or one of ``sparse.ALGORITHMS``)."""
        computation = self._gathered.get(algorithm)
        if computation is None:
            computation = self._gathered[algorithm] = GatheredComputation(algorithm)
        return computation

    def forget_choices(self) -> None:
        """Choose again at the next call of every case (the computations keep their caches)."""
        self._chosen.clear()

    def for_input(self, layer: DGCConv2d, x: Tensor) -> InferenceComputation:
        """The computation for ``layer``'s eval forward on the pre-activated 4-d ``x``."""
        if layer.inference_algorithm == "export" or exporting():
            return self._export
        if torch.compiler.is_compiling():
            return self._choose(layer, x, compiling=True)
        key = (x.device, x.dtype, layer.weight.dtype, layer.same_padding_for(x), compiled.is_paused())
        chosen = self._chosen.get(key)
        if chosen is None:
            chosen = self._chosen[key] = self._choose(layer, x, compiling=False)
        return chosen

    def for_preparation(self, layer: DGCConv2d) -> InferenceComputation:
        """The computation ``prepare_weights`` arranges for: the compiled op for a float32 CPU
        weight where the op runs, else the sparse computation of the layer's setting."""
        weight = layer.weight
        if weight.dtype == torch.float32 and weight.device.type == "cpu" and compiled.in_use():
            return self.compiled_op
        algorithm = layer.inference_algorithm
        return self.gathered(algorithm if algorithm not in ("compiled", "export", "masked") else "auto")

    def _choose(self, layer: DGCConv2d, x: Tensor, *, compiling: bool) -> InferenceComputation:
        algorithm = layer.inference_algorithm
        if algorithm in ("auto", "compiled"):
            refusal = self._op_refusal(layer, x, compiling)
            if refusal is None:
                return self.compiled_op
            if algorithm == "compiled":
                raise ValueError(f"inference_algorithm 'compiled' cannot run here: {refusal}")
        if algorithm == "masked":
            return self._masked
        return self.gathered("auto" if algorithm == "compiled" else algorithm)

    def _op_refusal(self, layer: DGCConv2d, x: Tensor, compiling: bool) -> str | None:
        """Why the compiled op cannot compute this case (None when it can)."""
        float_cpu = x.device.type == "cpu" and x.dtype == torch.float32 and layer.weight.dtype == torch.float32
        if compiling:  # no build and no packing while tracing: only what ``prepare`` packed
            ready = float_cpu and self._compiled_op is not None and self._compiled_op.packed is not None
            return None if ready and not _asymmetric(layer, x) else "not prepared before torch.compile"
        if not float_cpu or not compiled.in_use():
            return compiled.unavailable_reason() or "needs float32 on CPU"
        if _asymmetric(layer, x):
            return "its TF-'SAME' padding is one pixel larger on one side at this input size"
        return None


def _asymmetric(layer: DGCConv2d, x: Tensor) -> bool:
    pads = layer.same_padding_for(x)
    return pads is not None and (pads[0] != pads[1] or pads[2] != pads[3])
