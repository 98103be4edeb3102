"""What every eval-mode computation of a DGC layer is: one small interface.

A ``DGCConv2d`` in eval mode picks one ``InferenceComputation`` per case
(``dgc_convert.nn.inference.choice``) and calls it; the computation owns
whatever it arranges once for speed (a packed weight, gather
arrangements) and rebuilds that when the layer's weight changes. Every
computation sees the blocked layer: weight rows and bias in blocked order
(``DGCConv2d.blocked_weight`` / ``blocked_bias``); an interleaved layer
relabels the result afterwards, once, whichever computation ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:  # the layer imports this module: only the type, not a cycle
    from dgc_convert.nn.layer import DGCConv2d

__all__ = ["InferenceComputation"]


class InferenceComputation(ABC):
    """One way to compute a DGC layer's eval forward, with its own caches.

    Instances belong to one layer; copies of the layer start with none
    (they are rebuilt on demand, never copied or pickled).
    """

    @abstractmethod
    def __call__(self, layer: DGCConv2d, x: Tensor) -> Tensor:
        """The output (B, C', H', W') for the pre-activated input ``x`` (B >= 1), bias
        included, in the layer's blocked channel order."""

    @abstractmethod
    def prepare(self, layer: DGCConv2d) -> None:
        """Arrange the layer's weight for this computation now rather than at its first call."""
