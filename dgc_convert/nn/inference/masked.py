"""Eval through the training computation: every channel, the dropped ones gated to zero.

Dense in cost and free of gathers: the reference the faster computations
are checked against, and what ``inference_algorithm = "masked"`` selects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from dgc_convert.nn.inference.base import InferenceComputation

if TYPE_CHECKING:
    from dgc_convert.nn.layer import DGCConv2d

__all__ = ["MaskedComputation"]


class MaskedComputation(InferenceComputation):
    """The layer's training computation (``functional.gated_conv2d``), run in eval mode."""

    def __call__(self, layer: DGCConv2d, x: Tensor) -> Tensor:
        return layer.masked_forward(x)

    def prepare(self, layer: DGCConv2d) -> None:
        """Nothing to arrange: it convolves with the layer's weight as it is."""
