"""Eval through the PyTorch sparse algorithms: gather and convolve only the kept channels.

One algorithm by name, or "auto": the fastest for the case, timed once and
remembered process-wide (``dgc_convert.nn.sparse.pick_algorithm``). The
weight's arrangements for gathering are this computation's cache
(``sparse.WeightCache``), rebuilt whenever the layer's weight changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from dgc_convert.nn.inference.base import InferenceComputation
from dgc_convert.nn.sparse import WeightCache, pick_algorithm, sparse_conv2d

if TYPE_CHECKING:
    from dgc_convert.nn.layer import DGCConv2d

__all__ = ["GatheredComputation"]


class GatheredComputation(InferenceComputation):
    """The kept channels only, by ``algorithm`` (one of ``sparse.ALGORITHMS``, or "auto")."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self.cache = WeightCache()

    def __call__(self, layer: DGCConv2d, x: Tensor) -> Tensor:
        # Every algorithm gathers channels as rows of an NCHW tensor: convert a
        # channels-last input once, here.
        x = x.contiguous()
        scores = layer.gate_scores(x)
        layer.note_sparsity(scores)
        index, kept = layer.kept(scores)
        args = (
            layer.conv_input(x),  # the saliency generator pooled the unpadded input
            kept,
            index,
            layer.blocked_weight(),
            self.cache,
            layer.stride,
            layer.padding,
            layer.dilation,
        )
        algorithm = self.algorithm if self.algorithm != "auto" else pick_algorithm(*args)
        layer.last_algorithm = algorithm
        out = sparse_conv2d(*args, algorithm)
        bias = layer.blocked_bias()
        if bias is not None:
            out = out + bias.to(out.dtype).view(1, -1, 1, 1)
        return out

    def prepare(self, layer: DGCConv2d) -> None:
        self.cache.get(layer.blocked_weight(), layer.heads)
