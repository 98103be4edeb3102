"""The older interleaved head layout as one permutation of output channels.

Every kernel computes the blocked layout: head h owns the contiguous rows
``h*n : (h+1)*n`` of the weight (``n = C'/H``) and writes output channels in
that order. Layers saved before blocked ownership, and the authors'
checkpoints, are interleaved: head h owns the dense rows ``h::H`` (row
``j*H + h`` is its j-th filter). Such a layer is the blocked layer whose
weight (and bias) rows are the dense rows taken in ``blocked_rows`` order,
followed by one gather of its output channels in ``output_order``: both are
fixed relabellings, so the values are the same numbers, only placed
differently. This module is the one place that relabelling is written down.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["interleaved_output_order", "interleaved_blocked_rows", "interleave_head_major", "to_output_order"]


def interleaved_output_order(out_channels: int, heads: int, device: torch.device | None = None) -> Tensor:
    """For each dense output channel of an interleaved layer, its position in the blocked output:
    dense channel ``j*H + h`` is blocked channel ``h*n + j`` (int64, shape (C',))."""
    return torch.arange(out_channels, device=device).view(heads, out_channels // heads).t().reshape(-1)


def interleaved_blocked_rows(out_channels: int, heads: int, device: torch.device | None = None) -> Tensor:
    """The inverse of ``interleaved_output_order``: for each blocked row ``h*n + j``, the
    dense row ``j*H + h`` that holds it in an interleaved layer's weight (int64, shape (C',))."""
    return torch.arange(out_channels, device=device).view(out_channels // heads, heads).t().reshape(-1)


def interleave_head_major(head_major: Tensor) -> Tensor:
    """Per-head filters (H, n, ...) in the interleaved dense layout (H*n, ...): row ``j*H + h``
    is head h's j-th filter. How the authors' per-head convolutions become one dense weight."""
    return head_major.transpose(0, 1).flatten(0, 1)


def to_output_order(out: Tensor, order: Tensor, *, keep_layout: bool = True) -> Tensor:
    """``out`` (B, C', ...) with its channels gathered in ``order``: channel o of the result is
    channel ``order[o]`` of ``out``, in one copy. With ``keep_layout`` a channels-last ``out``
    stays channels-last (the compiled op's output); anything else comes back contiguous.
    Exporters pass False: the layout test would pin a traced 1-pixel map's size."""
    if (
        keep_layout
        and out.dim() == 4
        and out.is_contiguous(memory_format=torch.channels_last)
        and not out.is_contiguous()
    ):
        return out.permute(0, 2, 3, 1).index_select(3, order).permute(0, 3, 1, 2)
    return out.index_select(1, order)
