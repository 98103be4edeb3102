"""Each head's saliency generator: the per-sample channel scores of a DGC layer.

``docs/method.md`` section 1: for head i, ``g_i = relu(W2_i relu(W1_i p(x)) + beta_i)``,
one non-negative score per input channel and sample, which the layer's
selection then ranks. The hidden width follows a "squeeze rule" (ours or
the authors'), and so does the initialisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dgc_convert.nn.settings import DEFAULT_SQUEEZE_RULE, SQUEEZE_RULES

__all__ = [
    "SaliencyGenerator",
    "saliency_hidden_width",
    "saliency_macs",
    "SQUEEZE_RULES",
    "DEFAULT_SQUEEZE_RULE",
]

# Below this many input channels the authors' generator halves d.
_AUTHORS_HALVE_BELOW = 80
# The standard rule's smallest hidden width: thin layers keep a generator
# that can still express more than a couple of directions.
_MIN_HIDDEN = 4


def saliency_hidden_width(in_channels: int, squeeze_ratio: float, rule: str = DEFAULT_SQUEEZE_RULE) -> int:
    """Hidden units of each head's saliency generator for ``in_channels`` C and squeeze ratio d.

    "standard": ``max(C // d, 4)``. "authors" (their ``HeadConv``): d is an
    integer halved when C < 80, and the width is ``C // d`` (at least 1).
    """
    if rule == "authors":
        if squeeze_ratio != int(squeeze_ratio):
            raise ValueError(f"squeeze_rule 'authors' needs a whole squeeze_ratio, got {squeeze_ratio!r}")
        ratio = int(squeeze_ratio)
        if in_channels < _AUTHORS_HALVE_BELOW:
            ratio //= 2
        return max(in_channels // max(ratio, 1), 1)
    if rule != "standard":
        raise ValueError(f"squeeze_rule must be one of {', '.join(SQUEEZE_RULES)}, got {rule!r}")
    return max(int(in_channels // squeeze_ratio), _MIN_HIDDEN)


def saliency_macs(in_channels: int, heads: int, hidden: int) -> int:
    """MACs per sample of all heads' saliency FCs: ``H * 2 * C * hidden`` (the
    first part of the method's cost formula, ``docs/method.md`` section 4)."""
    return heads * 2 * in_channels * hidden


class SaliencyGenerator(nn.Module):
    """One SE-shaped saliency generator per head, computed for all heads at once.

    For head ``i``: ``g_i = relu(W2_i relu(W1_i avgpool(x)) + beta_i)`` with
    ``W1_i``: C -> hidden (no bias), ``W2_i``: hidden -> C (no bias) and
    ``beta_i`` a learned per-channel bias initialised to 1.0, so a new layer
    starts out close to a dense convolution.
    """

    def __init__(self, in_channels: int, heads: int, hidden: int, init: str = DEFAULT_SQUEEZE_RULE) -> None:
        super().__init__()
        if init not in SQUEEZE_RULES:
            raise ValueError(f"init must be one of {', '.join(SQUEEZE_RULES)}, got {init!r}")
        self.in_channels = in_channels
        self.heads = heads
        self.hidden = hidden
        self.init = init
        self.reduce = nn.Parameter(torch.empty(heads, hidden, in_channels))
        self.expand = nn.Parameter(torch.empty(heads, in_channels, hidden))
        self.beta = nn.Parameter(torch.empty(heads, in_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the FC weights and set beta to 1.

        "standard": like ``nn.Linear``, uniform in ±1/sqrt(fan_in): the scores
        start close to beta, so a converted pretrained convolution starts
        close to what it computed. "authors": ``kaiming_normal_`` per head
        (normal, std sqrt(2 / fan_in)), as the released code does.
        """
        with torch.no_grad():
            for weight, fan_in in ((self.reduce, self.in_channels), (self.expand, self.hidden)):
                if self.init == "authors":
                    weight.normal_(0.0, math.sqrt(2.0 / fan_in))
                else:
                    weight.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
        nn.init.ones_(self.beta)

    def forward(self, x: Tensor) -> Tensor:
        """Scores of shape (batch, heads, in_channels), all >= 0."""
        # sum-then-divide: the backward of mean over a large spatial map is
        # several times slower than that of sum on CPU.
        pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
        # Batched products over heads, (H, B, .), in as few operations as
        # possible: at batch 1 the per-operation cost is what eval pays for.
        squeezed = torch.matmul(pooled, self.reduce.transpose(1, 2)).relu_()  # (H, B, hidden)
        scores = torch.baddbmm(self.beta.unsqueeze(1), squeezed, self.expand.transpose(1, 2)).relu_()  # (H, B, C)
        return scores.transpose(0, 1)

    def extra_repr(self) -> str:
        text = f"in_channels={self.in_channels}, heads={self.heads}, hidden={self.hidden}"
        return text + (f", init={self.init!r}" if self.init != DEFAULT_SQUEEZE_RULE else "")
