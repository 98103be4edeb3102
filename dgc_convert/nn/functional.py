"""Head-wise gated convolution with a lean backward pass.

Computes, for every head ``h`` and sample ``b``,
``out[b, rows_h] = conv2d(x[b] * gate[b, h], weight[rows_h])``, which is the
DGC method: ``gate`` holds the saliency score of each kept input channel and
zero for every dropped one, so the product equals gathering the kept channels,
scaling them and convolving them with the matching weight columns.

``rows_h``, the output channels (rows of the dense weight) head ``h`` owns,
are the contiguous block ``h*C'/H : (h+1)*C'/H`` (the blocked layout), so
head-major results are already in dense channel order. A layer of the older
interleaved layout hands these functions its weight rows in blocked order
and relabels the output itself (``dgc_convert.nn.channel_order``).

Plain autograd would save one gated copy of the input per head for backward
(the authors' layer: H times the activation memory). The functions here save only
``x``, ``gate`` and the head-major view of ``weight`` and recompute the gated
input in backward: one head at a time (``per_head``: at most one extra
input-sized buffer at once), or, on tiny feature maps where per-call overhead
dominates, all heads' copies for the one grouped convolution that uses them
(``stacked``); ``per_sample`` folds the gates into per-sample filters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# What backward returns: one gradient per forward input (None where not
# needed); stride, padding and dilation never get one.
_Grads = tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]


def head_weights(weight: Tensor, heads: int) -> Tensor:
    """(C', C, kh, kw) -> (H, C'/H, C, kh, kw), a view: entry [h, j] is ``weight[h*C'/H + j]``, head h's j-th filter."""
    out_channels = weight.shape[0]
    return weight.view(heads, out_channels // heads, *weight.shape[1:])


class _GatedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        gate: Tensor,
        weight: Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> Tensor:
        heads = gate.shape[1]
        head_major = head_weights(weight, heads)
        outputs = [
            F.conv2d(x * gate[:, h, :, None, None], head_major[h], None, stride, padding, dilation)
            for h in range(heads)
        ]
        ctx.save_for_backward(x, gate, head_major)
        ctx.conv_args = (stride, padding, dilation)
        return torch.cat(outputs, dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> _Grads:
        # ctx is untyped (torch's stubs give saved_tensors as a 1-tuple): name what forward saved.
        saved: tuple[Tensor, Tensor, Tensor] = ctx.saved_tensors
        x, gate, head_major = saved
        conv_args: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] = ctx.conv_args
        stride, padding, dilation = conv_args
        heads = gate.shape[1]
        needs: tuple[bool, ...] = ctx.needs_input_grad
        need_x, need_gate, need_weight = needs[:3]
        # The output gradient head-major with every head's slice contiguous (a view for NCHW).
        batch, out_channels = grad_out.shape[:2]
        grad_heads = grad_out.view(batch, heads, out_channels // heads, *grad_out.shape[2:]).contiguous()

        grad_x: Tensor | None = None
        grad_gate = torch.empty_like(gate) if need_gate else None
        grad_head_weights = torch.empty_like(head_major) if need_weight else None
        need_conv_input = need_x or need_gate
        for h in range(heads):
            gate_h = gate[:, h, :, None, None]
            grad_input_h, grad_weight_h, _ = torch.ops.aten.convolution_backward(
                grad_heads[:, h],
                x * gate_h,
                head_major[h],
                None,
                stride,
                padding,
                dilation,
                False,
                [0, 0],
                1,
                [need_conv_input, need_weight, False],
            )
            if need_x:
                # The first head writes, the others accumulate: no zero fill.
                grad_x = grad_input_h * gate_h if grad_x is None else grad_x.addcmul_(grad_input_h, gate_h)
            if grad_gate is not None:  # exactly when need_gate
                grad_gate[:, h] = torch.linalg.vecdot(grad_input_h.flatten(2), x.flatten(2))
            if grad_head_weights is not None:  # exactly when need_weight
                grad_head_weights[h] = grad_weight_h
        grad_weight = None
        if grad_head_weights is not None:
            grad_weight = grad_head_weights.flatten(0, 1)
        return grad_x, grad_gate, grad_weight, None, None, None


class _StackedGatedConv2d(torch.autograd.Function):
    """All heads in one grouped convolution over a gated copy of the input per
    head, (B, H*C, h, w). The copy is rebuilt in backward rather than saved
    (only x, gate and the head-major weight are kept), so it lives only while
    a convolution runs. One call per direction instead of one per head: on
    small feature maps (4x4 and below) per-call overhead is what costs."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        gate: Tensor,
        weight: Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> Tensor:
        heads = gate.shape[1]
        # (C', C, kh, kw) head-major is ``weight`` itself.
        out = F.conv2d(gated_copies(x, gate), weight, None, stride, padding, dilation, groups=heads)
        ctx.save_for_backward(x, gate, weight)
        ctx.conv_args = (stride, padding, dilation)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> _Grads:
        saved: tuple[Tensor, Tensor, Tensor] = ctx.saved_tensors
        x, gate, grouped = saved
        conv_args: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] = ctx.conv_args
        stride, padding, dilation = conv_args
        needs: tuple[bool, ...] = ctx.needs_input_grad
        need_x, need_gate, need_weight = needs[:3]
        batch, channels = x.shape[:2]
        heads = gate.shape[1]
        grad_stacked, grad_grouped, _ = torch.ops.aten.convolution_backward(
            grad_out,
            gated_copies(x, gate),
            grouped,
            None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            heads,
            [need_x or need_gate, need_weight, False],
        )
        grad_x: Tensor | None = None
        grad_gate: Tensor | None = None
        grad_weight: Tensor | None = None
        if need_x or need_gate:
            grad_stacked = grad_stacked.view(batch, heads, channels, *x.shape[2:])
            if need_x:
                grad_x = (grad_stacked * gate[..., None, None]).sum(1)
            if need_gate:
                grad_gate = torch.linalg.vecdot(grad_stacked.flatten(3), x.unsqueeze(1).flatten(3))
        if need_weight:
            grad_weight = grad_grouped
        return grad_x, grad_gate, grad_weight, None, None, None


def gated_copies(x: Tensor, gate: Tensor) -> Tensor:
    """(B, C, h, w) x (B, H, C) -> (B, H*C, h, w): each head's gated copy of the input."""
    return (x.unsqueeze(1) * gate[..., None, None]).flatten(1, 2)


def _per_sample_gated_conv2d(
    x: Tensor,
    gate: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """The same product with the gate folded into per-sample filters, all
    samples in one convolution with ``groups=batch``. Plain autograd: it saves
    the per-sample filters (batch x weight size), which ``_prefers_per_sample``
    keeps within twice the size of the input."""
    batch, channels = x.shape[:2]
    heads = gate.shape[1]
    out_channels = weight.shape[0]
    # (B, C', C): row o is the gate of the head that owns output channel o, o // (C'/H).
    gate_per_output = gate.repeat_interleave(out_channels // heads, dim=1)
    filters = weight.unsqueeze(0) * gate_per_output[..., None, None]
    out = F.conv2d(
        x.reshape(1, batch * channels, *x.shape[2:]),
        filters.reshape(batch * out_channels, channels, *weight.shape[2:]),
        None,
        stride,
        padding,
        dilation,
        groups=batch,
    )
    return out.view(batch, out_channels, *out.shape[2:])


def _prefers_per_sample(x: Tensor, weight: Tensor) -> bool:
    # Per-sample filters cost batch * C' * C * kh * kw elements; one gated
    # copy of the input costs batch * C * H * W. Fold into the filters while
    # they stay within twice that (early, high-resolution layers): there the
    # per-head loop's elementwise passes over the input dominate its time
    # (benchmarks/layer_step.py: 64@56 and 128@28 run faster folded, 256@14
    # and 512@7 faster head by head).
    return weight.shape[0] * weight.shape[2] * weight.shape[3] <= 2 * x.shape[2] * x.shape[3]


GATED_CONV_ALGORITHMS = ("auto", "per_head", "per_sample", "stacked")  # how training computes the gated conv
# Feature maps up to this many pixels run all heads as one grouped convolution
# (benchmarks/train_throughput.py; layer timings at 4x4 and below favour it).
_STACKED_MAX_PIXELS = 16


def gated_conv2d(
    x: Tensor,
    gate: Tensor,
    weight: Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    algorithm: str = "auto",
) -> Tensor:
    """Head-wise gated convolution, no bias.

    Args:
        x: input (B, C, H, W).
        gate: (B, heads, C): the factor each head applies to each input channel
            (its saliency score where kept, 0 where dropped).
        weight: dense-layout filters (C', C, kh, kw); head h owns the rows
            ``h*C'/heads : (h+1)*C'/heads``.
        algorithm: "per_head" (one head at a time, recomputing the gated input
            in backward), "per_sample" (gates folded into per-sample filters,
            one grouped convolution), "stacked" (all heads in one grouped
            convolution) or "auto" (by buffer size). All are exact.

    Returns:
        (B, C', H', W'), channel o computed with filter ``weight[o]`` by the head that owns it.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Run the whole function in the autocast dtype so forward and backward
        # agree on dtypes; gradients flow back through the casts.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return gated_conv2d(
                x.to(dtype),
                gate.to(dtype),
                weight.to(dtype),
                stride,
                padding,
                dilation,
                algorithm,
            )
    if algorithm not in GATED_CONV_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(map(repr, GATED_CONV_ALGORITHMS))}, got {algorithm!r}")
    if algorithm == "auto":
        if _prefers_per_sample(x, weight):
            algorithm = "per_sample"
        else:
            algorithm = "stacked" if x.shape[2] * x.shape[3] <= _STACKED_MAX_PIXELS else "per_head"
    if algorithm == "per_sample":
        return _per_sample_gated_conv2d(x, gate, weight, stride, padding, dilation)
    # Function.apply is typed as returning Any; forward returns one Tensor.
    out: Tensor
    if algorithm == "stacked":
        out = _StackedGatedConv2d.apply(x, gate, weight, stride, padding, dilation)
    else:
        out = _GatedConv2d.apply(x, gate, weight, stride, padding, dilation)
    return out
