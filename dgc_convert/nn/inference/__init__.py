"""How a DGC layer computes in eval mode: one interface, one module per computation.

``InferenceComputation`` (``base``) is the interface; the computations are
the compiled CPU op (``compiled_op``), the PyTorch sparse algorithms
(``gathered``), the training computation (``masked``) and the graph form
for exporters (``export_graph``). ``InferencePlan`` (``choice``) holds a
layer's computations and chooses one per case, once.
"""

from dgc_convert.nn.inference.base import InferenceComputation
from dgc_convert.nn.inference.choice import InferencePlan

__all__ = ["InferenceComputation", "InferencePlan"]
