"""Eval through the compiled CPU op ``dgc_convert::dgc_conv2d``: one call per layer and batch.

The op takes its weight prepacked (``compiled.pack_weight``); the packed
weight is this computation's state, packed again whenever the layer's
weight changes. Under ``torch.compile`` nothing is packed (tracing must not
change state): the weight ``prepare`` packed beforehand is what the graph
captures, as ``prepare_for_inference`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dgc_convert.nn import compiled
from dgc_convert.nn.inference.base import InferenceComputation
from dgc_convert.nn.tensor_state import tensor_state

if TYPE_CHECKING:
    from dgc_convert.nn.layer import DGCConv2d

__all__ = ["CompiledOpComputation"]


class CompiledOpComputation(InferenceComputation):
    """Saliency, selection and the sparse convolution in one call of the compiled op
    (float32 on CPU, symmetric padding: the op pools the input it pads)."""

    def __init__(self) -> None:
        self.packed: Tensor | None = None  # flat: the layer's memory-format changes never restride it
        self._key: tuple[object, ...] | None = None

    def __call__(self, layer: DGCConv2d, x: Tensor) -> Tensor:
        padding = layer.padding
        pads = layer.same_padding_for(x)
        if pads is not None:  # symmetric here: ``choice`` sends asymmetric sizes elsewhere
            padding = (layer.padding[0] + pads[2], layer.padding[1] + pads[0])
        flat = self.packed if torch.compiler.is_compiling() else self.packed_weight(layer)
        assert flat is not None  # while compiling, ``choice`` picks this only once packed
        layer.last_algorithm = "compiled"
        kh, kw = layer.kernel_size
        packed = flat.view(layer.heads, layer.in_channels, kh, kw, layer.out_channels // layer.heads)
        return compiled.blocked_dgc_conv2d_for_layer(layer, x, packed, padding)

    def packed_weight(self, layer: DGCConv2d) -> Tensor:
        """The layer's prepacked weight (flat), packed again whenever its weight changed."""
        weight = layer.blocked_weight()
        key = (tensor_state(weight), layer.heads)
        if self.packed is None or self._key != key:
            with torch.no_grad():
                self.packed = compiled.pack_weight(weight, layer.heads).reshape(-1)
            self._key = key
        return self.packed

    def prepare(self, layer: DGCConv2d) -> None:
        self.packed_weight(layer)
