"""Head-wise gated convolution with a lean backward pass.

Computes, for every head ``h`` and sample ``b``,
``out[b, h::H] = conv2d(x[b] * gate[b, h], weight[h::H])``, which is the
DGC method: ``gate`` holds the saliency score of each kept input channel and
zero for every dropped one, so the product equals gathering the kept channels,
scaling them and convolving them with the matching weight columns (steps 1-4
of the method, channel shuffle included, since head ``h`` writes the output
channels ``h::H``).

Plain autograd would save one gated copy of the input per head for backward
(the authors' layer: H times the activation memory). The functions here save only
``x``, ``gate`` and a head-major copy of ``weight`` and recompute the gated
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
    """(C', C, kh, kw) -> (H, C'/H, C, kh, kw) with entry [h, j] = weight[j*H + h] (a contiguous copy)."""
    out_channels = weight.shape[0]
    return weight.view(out_channels // heads, heads, *weight.shape[1:]).transpose(0, 1).contiguous()


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
        # Keep the head-major copy of the weight (one weight's worth of memory)
        # rather than rebuilding it in backward.
        ctx.save_for_backward(x, gate, head_major)
        ctx.conv_args = (stride, padding, dilation)
        # (B, C'/H, H, ...) flattened puts head h's j-th channel at j*H + h.
        return torch.stack(outputs, dim=2).flatten(1, 2)

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
        batch, out_channels = grad_out.shape[:2]
        # One head-major copy of the output gradient, so every head's slice is contiguous.
        grad_heads = (
            grad_out.view(batch, out_channels // heads, heads, *grad_out.shape[2:]).transpose(1, 2).contiguous()
        )

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
            # One contiguous transpose back to the dense layout (row j*H + h); far
            # cheaper than writing each head into its strided rows.
            grad_weight = grad_head_weights.transpose(0, 1).reshape(out_channels, *head_major.shape[2:])
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
        grouped = head_weights(weight, heads).flatten(0, 1)  # (C', C, kh, kw), head-major
        out = F.conv2d(gated_copies(x, gate), grouped, None, stride, padding, dilation, groups=heads)
        ctx.save_for_backward(x, gate, grouped)
        ctx.conv_args = (stride, padding, dilation)
        return head_major_to_dense(out, heads)

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
        out_channels = grouped.shape[0]
        grad_head_major = grad_out.view(batch, out_channels // heads, heads, *grad_out.shape[2:]).transpose(1, 2)
        grad_stacked, grad_grouped, _ = torch.ops.aten.convolution_backward(
            grad_head_major.flatten(1, 2),
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
            # head-major rows (h, j) back to the dense layout (j*H + h)
            grad_weight = (
                grad_grouped.view(heads, out_channels // heads, *grouped.shape[1:])
                .transpose(0, 1)
                .reshape(grouped.shape)
            )
        return grad_x, grad_gate, grad_weight, None, None, None


def head_major_to_dense(out: Tensor, heads: int) -> Tensor:
    """Channel shuffle of a head-major output (channel h*C'/H + j) into dense order
    (channel j*H + h), as one copy into NCHW whatever the input's layout."""
    batch, out_channels, height, width = out.shape
    per_head = out_channels // heads
    if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
        grouped = out.permute(0, 2, 3, 1).view(batch, height, width, heads, per_head).permute(0, 4, 3, 1, 2)
    else:
        grouped = out.view(batch, heads, per_head, height, width).transpose(1, 2)
    return grouped.reshape(batch, out_channels, height, width)


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
    # Output channel o belongs to head o % heads.
    gate_per_output = gate.repeat(1, out_channels // heads, 1)  # (B, C', C), row o = gate[:, o % H]
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
        weight: dense-layout filters (C', C, kh, kw); head h owns ``weight[h::heads]``.
        algorithm: "per_head" (one head at a time, recomputing the gated input
            in backward), "per_sample" (gates folded into per-sample filters,
            one grouped convolution) or "auto" (by buffer size). All are exact.

    Returns:
        (B, C', H', W'), channel ``j*heads + h`` computed by head ``h``.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Run the whole function in the autocast dtype so forward and backward
        # agree on dtypes; gradients flow back through the casts.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return gated_conv2d(x.to(dtype), gate.to(dtype), weight.to(dtype), stride, padding, dilation, algorithm)
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
