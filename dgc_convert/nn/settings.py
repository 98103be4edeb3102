"""A DGC layer's settings and their defaults, in one place (no torch: the CLI's help reads them)."""

from __future__ import annotations

__all__ = [
    "DEFAULT_HEADS",
    "DEFAULT_SQUEEZE_RATIO",
    "DEFAULT_ZETA",
    "DEFAULT_GATING",
    "DEFAULT_SQUEEZE_RULE",
    "GATINGS",
    "SQUEEZE_RULES",
]

# The layer's defaults, which the recipe schema (``ConvertSection``) uses too:
# a layer built by hand and one converted with default settings agree.
DEFAULT_HEADS = 4
DEFAULT_SQUEEZE_RATIO = 16
DEFAULT_ZETA = 0.5

# How a layer decides which channels a head keeps: "head", each head its top
# k (the paper's head-wise DGC); "network", every channel whose score is above
# one threshold shared by the whole model (DGC-G, see ``threshold``).
GATINGS: tuple[str, ...] = ("head", "network")
DEFAULT_GATING = "head"
# The saliency generator's hidden width and initialisation ("squeeze rule"):
# "standard", ``max(C // d, 4)`` hidden units and nn.Linear's uniform init;
# "authors", the released code's rule: d halved below 80 input channels,
# ``C // d`` units, kaiming-normal FC weights. Both start the bias beta at 1.
SQUEEZE_RULES: tuple[str, ...] = ("standard", "authors")
DEFAULT_SQUEEZE_RULE = "standard"
