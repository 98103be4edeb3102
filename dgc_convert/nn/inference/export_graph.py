"""Eval in the graph form ONNX, torch.export and jit tracing record.

The kept channels as a gate (TopK + ScatterElements head-wise; a comparison
with T, and ArgMax for each head's top channel, under network gating) and
one grouped convolution over the heads' gated copies, whose output is in
blocked order. No Python loops, no data-dependent shapes, no timing and no
cached weight arrangements (two traces must give the same graph); equal to
the other computations. MAC counting traces this form too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dgc_convert.nn.functional import gated_copies
from dgc_convert.nn.inference.base import InferenceComputation

if TYPE_CHECKING:
    from dgc_convert.nn.layer import DGCConv2d

__all__ = ["ExportGraphComputation"]


class ExportGraphComputation(InferenceComputation):
    """Gate every channel, convolve all heads in one grouped convolution (dense in cost)."""

    def __call__(self, layer: DGCConv2d, x: Tensor) -> Tensor:
        gate = layer.dense_gate(layer.gate_scores(x))
        # The blocked weight is head-major: group h of the grouped convolution is head h.
        out = torch.nn.functional.conv2d(
            gated_copies(layer.conv_input(x), gate),
            layer.blocked_conv_weight(),
            None,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.heads,
        )
        bias = layer.blocked_bias()
        if bias is not None:
            out = out + bias.to(out.dtype).view(1, -1, 1, 1)
        return out

    def prepare(self, layer: DGCConv2d) -> None:
        """Nothing to arrange: it convolves with the layer's weight as it is."""
