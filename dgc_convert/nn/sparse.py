"""Sparse inference for DGC layers: compute only the kept channels, exactly.

Five algorithms (``gather_conv``, ``gather_bmm``, ``gather_pointwise``, ``stacked``, ``masked``);
which is fastest depends on shape, batch, ``k`` and machine, so ``pick_algorithm`` times each once
per case and caches the winner, and ``WeightCache`` keeps the weights arranged for gathering.
Every function computes the blocked layout. What each algorithm does: ``docs/serving.md``,
"Sparse inference algorithms".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dgc_convert.nn.functional import gated_conv2d, gated_copies, head_weights

__all__ = ["ALGORITHMS", "WeightCache", "sparse_conv2d", "pick_algorithm", "clear_algorithm_cache", "algorithm_cache"]

ALGORITHMS = ("gather_conv", "gather_bmm", "gather_pointwise", "stacked", "masked")
_TIMING_ROUNDS = 5
_TIMING_BATCH = 8


@dataclass
class WeightCache:
    """The weight rearranged for gathering, rebuilt whenever the weight changes.

    ``rows``: (heads * C, kh * kw * C'/heads); row ``h*C + c`` holds head h's
    filters over input channel c, for the matrix-product path.
    ``conv``: (heads, C, C'/heads, kh, kw), for the grouped-convolution path.
    ``grouped``: (C', C, kh, kw) head-major, for ``stacked`` (the weight
    itself, not a copy).
    """

    key: tuple[object, ...] = ()
    rows: Tensor | None = None
    conv: Tensor | None = None
    offsets: Tensor | None = None  # (heads, 1): h * C, turns per-head channel indices into rows
    grouped: Tensor | None = None  # (C', C, kh, kw) head-major, for one grouped convolution over all heads

    def get(self, weight: Tensor, heads: int) -> WeightCache:
        """Up-to-date arrangements of ``weight`` (dense layout; head h owns the
        rows ``h*C'/heads : (h+1)*C'/heads``)."""
        # Inference tensors (made under torch.inference_mode) keep no version counter.
        version = None if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, weight.dtype, weight.device, heads)
        if key != self.key:
            out_channels, channels, kh, kw = weight.shape
            # head_major[h, j]: head h's j-th filter
            head_major = head_weights(weight.detach(), heads)  # (H, C'/H, C, kh, kw)
            self.conv = head_major.permute(0, 2, 1, 3, 4).contiguous()  # (H, C, C'/H, kh, kw)
            # (H, C, kh*kw, C'/H) flattened to rows of (kh*kw * C'/H), ordered (kernel offset, filter)
            self.rows = head_major.permute(0, 2, 3, 4, 1).reshape(heads * channels, kh * kw * (out_channels // heads))
            self.grouped = head_major.reshape(out_channels, channels, kh, kw)
            self.offsets = torch.arange(heads, device=weight.device).mul_(channels).view(heads, 1)
            self.key = key
        return self


def _flat_index(index: Tensor, rows_per_group: int) -> Tensor:
    """(..., G, k) indices into groups of ``rows_per_group`` rows -> flat row indices."""
    groups = index.shape[-2]
    offsets = torch.arange(groups, device=index.device).mul_(rows_per_group).view(groups, 1)
    return (index + offsets).flatten()


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def gather_conv(
    x: Tensor,
    scores: Tensor,
    index: Tensor,
    weight: Tensor,
    cache: WeightCache,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Grouped convolution over gathered channels, one sample at a time.

    ``scores``/``index``: (B, heads, k) kept channels and their scores.
    Channels are gathered as rows of the NCHW input (a channels-last input is
    converted first: gathering along its last axis is several times slower);
    the filters are handed to oneDNN channels-last, which makes its grouped
    convolution 2-4x faster on CPU; the output comes back NCHW (one copy: the
    grouped convolution's output is channels-last).
    """
    x = x.contiguous()
    batch, channels = x.shape[:2]
    heads, k = index.shape[1:]
    out_channels, _, kh, kw = weight.shape
    per_head = out_channels // heads
    cache = cache.get(weight, heads)
    assert cache.conv is not None and cache.offsets is not None  # get() fills every arrangement
    arranged, offsets = cache.conv.view(heads * channels, per_head, kh, kw), cache.offsets
    fold_into_input = x.shape[2] * x.shape[3] <= per_head * kh * kw
    outputs = []
    for b in range(batch):
        selected_x = x[b].index_select(0, index[b].flatten())  # (H*k, h, w)
        selected_w = arranged.index_select(0, (index[b] + offsets).flatten()).view(heads, k, per_head, kh, kw)
        if fold_into_input:
            selected_x = selected_x * scores[b].reshape(heads * k, 1, 1)
        else:
            selected_w = selected_w * scores[b].view(heads, k, 1, 1, 1)
        # Head-major filters (C', k, kh, kw) laid out channels-last, in one copy.
        filters = selected_w.permute(0, 2, 3, 4, 1).reshape(out_channels, kh, kw, k).permute(0, 3, 1, 2)
        outputs.append(F.conv2d(selected_x.unsqueeze(0), filters, None, stride, padding, dilation, groups=heads))
    out = torch.cat(outputs) if batch > 1 else outputs[0]
    # The channels-last filters make the output channels-last: back to NCHW.
    return out.contiguous()


def gather_bmm(
    x: Tensor,
    scores: Tensor,
    index: Tensor,
    weight: Tensor,
    cache: WeightCache,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """im2col + one batched matrix product over (sample, head) with gathered weights."""
    batch, channels, height, width = x.shape
    heads, k = index.shape[1:]
    out_channels, _, kh, kw = weight.shape
    per_head = out_channels // heads
    taps = kh * kw
    out_h = _output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = _output_size(width, kw, stride[1], padding[1], dilation[1])
    pixels = out_h * out_w
    if taps == 1 and stride == (1, 1) and padding == (0, 0):
        columns = x.reshape(batch * channels, pixels)
    else:
        columns = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        columns = columns.view(batch * channels, taps * pixels)  # rows (b, c), columns (offset, pixel)
    rows = _flat_index(index.view(batch, heads * k), channels)  # b*C + c, per (b, h, kept)
    selected = columns.index_select(0, rows).view(batch * heads, k * taps, pixels)
    flat_weight = _flat_index(index.transpose(0, 1).reshape(heads, batch * k), channels)  # h*C + c
    arranged = cache.get(weight, heads).rows
    assert arranged is not None  # get() fills every arrangement
    selected_w = arranged.index_select(0, flat_weight)  # (H*B*k, taps*C'/H)
    selected_w = (
        selected_w.view(heads, batch, k * taps, per_head).transpose(0, 1).reshape(batch * heads, k * taps, per_head)
    )
    score_rows = scores.reshape(batch * heads, k, 1).expand(-1, -1, taps).reshape(batch * heads, k * taps, 1)
    if pixels <= per_head:
        selected = selected * score_rows
    else:
        selected_w = selected_w * score_rows
    if pixels >= per_head:
        # (B*H, C'/H, pixels) is already (B, C', pixels) in dense order: no copy.
        # With fewer pixels than filters per head (7x7 maps), the product
        # below runs faster even with its copy (measured on CPU).
        out = torch.bmm(selected_w.transpose(1, 2), selected)
        return out.view(batch, out_channels, out_h, out_w)
    out = torch.bmm(selected.transpose(1, 2), selected_w)  # (B*H, pixels, C'/H)
    # (B, H, pixels, C'/H) -> (B, H, C'/H, pixels): output channel h*C'/H + j
    return out.transpose(1, 2).contiguous().view(batch, out_channels, out_h, out_w)


def gather_pointwise(
    x: Tensor,
    scores: Tensor,
    index: Tensor,
    weight: Tensor,
    cache: WeightCache,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """1x1 convolutions: per sample, one batched product over heads of the
    gathered filters (C'/H x k) by the gathered input rows (k x pixels)."""
    sub = x[:, :, :: stride[0], :: stride[1]] if stride != (1, 1) else x
    sub = sub.contiguous()
    batch, channels, height, width = sub.shape
    heads, k = index.shape[1:]
    out_channels = weight.shape[0]
    per_head = out_channels // heads
    pixels = height * width
    cache = cache.get(weight, heads)
    rows, offsets = cache.rows, cache.offsets  # rows: (H*C, C'/H) for a 1x1 kernel
    assert rows is not None and offsets is not None  # get() fills every arrangement
    flat = sub.view(batch, channels, pixels)
    outputs = []
    for b in range(batch):
        selected_x = flat[b].index_select(0, index[b].flatten()).view(heads, k, pixels)
        selected_w = rows.index_select(0, (index[b] + offsets).flatten()).view(heads, k, per_head)
        if pixels <= per_head:
            selected_x = selected_x * scores[b].view(heads, k, 1)
        else:
            selected_w = selected_w * scores[b].view(heads, k, 1)
        outputs.append(torch.bmm(selected_w.transpose(1, 2), selected_x))  # (H, C'/H, P)
    out = torch.stack(outputs) if batch > 1 else outputs[0].unsqueeze(0)  # (B, H, C'/H, P)
    return out.view(batch, out_channels, height, width)


def masked(
    x: Tensor,
    scores: Tensor,
    index: Tensor,
    weight: Tensor,
    cache: WeightCache,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """The training computation: every channel, the dropped ones gated to zero."""
    gate = torch.zeros(x.shape[0], index.shape[1], x.shape[1], dtype=scores.dtype, device=x.device)
    gate.scatter_(2, index, scores)
    return gated_conv2d(x, gate, weight, stride, padding, dilation)


def stacked(
    x: Tensor,
    scores: Tensor,
    index: Tensor,
    weight: Tensor,
    cache: WeightCache,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Dense in cost like ``masked``, but one grouped convolution over a gated
    copy of the input per head (heads x the input, transient: no backward to
    keep it for) instead of one convolution per head; wins on small maps."""
    batch, channels = x.shape[:2]
    heads = index.shape[1]
    gate = torch.zeros(batch, heads, channels, dtype=scores.dtype, device=x.device).scatter_(2, index, scores)
    grouped = cache.get(weight, heads).grouped
    assert grouped is not None  # get() fills every arrangement
    return F.conv2d(gated_copies(x, gate), grouped, None, stride, padding, dilation, groups=heads)


# The arguments every algorithm takes: x, scores, index, weight, cache, stride, padding, dilation.
_Args = tuple[Tensor, Tensor, Tensor, Tensor, WeightCache, tuple[int, int], tuple[int, int], tuple[int, int]]
_Algorithm = Callable[
    [Tensor, Tensor, Tensor, Tensor, WeightCache, tuple[int, int], tuple[int, int], tuple[int, int]], Tensor
]

_FUNCTIONS: dict[str, _Algorithm] = {
    "gather_conv": gather_conv,
    "gather_bmm": gather_bmm,
    "gather_pointwise": gather_pointwise,
    "stacked": stacked,
    "masked": masked,
}


def _applicable(name: str, x: Tensor, weight: Tensor, padding: tuple[int, int]) -> bool:
    if name == "gather_pointwise":
        return weight.shape[2:] == (1, 1) and tuple(padding) == (0, 0)
    return True


_CACHE: dict[tuple[object, ...], str] = {}


def algorithm_cache() -> dict[tuple[object, ...], str]:
    """The algorithm picked for every case timed so far (a copy)."""
    return dict(_CACHE)


def clear_algorithm_cache() -> None:
    """Forget every timed choice (they are re-measured on the next call)."""
    _CACHE.clear()


def _case(
    x: Tensor,
    index: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[object, ...]:
    return (
        tuple(x.shape),
        index.shape[1],
        index.shape[2],
        tuple(weight.shape),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        x.dtype,
        x.device.type,
        torch.get_num_threads(),
    )


def pick_algorithm(
    x: Tensor,
    scores: Tensor,
    index: Tensor,
    weight: Tensor,
    cache: WeightCache,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> str:
    """The fastest exact algorithm for this case: timed once, then cached."""
    case = _case(x, index, weight, stride, padding, dilation)
    choice = _CACHE.get(case)
    if choice is not None:
        return choice
    candidates = [name for name in _FUNCTIONS if _applicable(name, x, weight, padding)]
    args: _Args = (x, scores, index, weight, cache, stride, padding, dilation)
    if x.shape[0] <= _TIMING_BATCH:
        choice = _fastest(candidates, args, _TIMING_ROUNDS)
    else:
        # Large batches: rank on the first few samples (cheap), then settle the
        # winner against the masked computation on the whole batch, because
        # costs do not scale alike (caches), and the sparse path must never
        # be slower than the masked one.
        head: _Args = (x[:_TIMING_BATCH], scores[:_TIMING_BATCH], index[:_TIMING_BATCH], *args[3:])
        winner = _fastest(candidates, head, _TIMING_ROUNDS)
        choice = winner if winner == "masked" else _fastest([winner, "masked"], args, 2)
    _CACHE[case] = choice
    return choice


def _fastest(names: list[str], args: _Args, rounds: int) -> str:
    """The name whose function runs ``args`` fastest (best of ``rounds`` interleaved runs, after a warm-up)."""
    device = args[0].device
    for name in names:
        _FUNCTIONS[name](*args)  # warm-up: allocations, weight arrangement
    best = dict.fromkeys(names, float("inf"))
    for _ in range(rounds):
        for name in names:  # interleaved, so machine noise hits every candidate alike
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            _FUNCTIONS[name](*args)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.__getitem__)


def sparse_conv2d(
    x: Tensor,
    scores: Tensor,
    index: Tensor,
    weight: Tensor,
    cache: WeightCache,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    algorithm: str = "auto",
) -> Tensor:
    """Head-wise gated convolution over the kept channels only (no bias).

    Args:
        x: input (B, C, H, W).
        scores: (B, heads, k) saliency scores of the kept channels.
        index: (B, heads, k) their input-channel indices.
        weight: dense-layout filters (C', C, kh, kw); head h owns the rows
            ``h*C'/heads : (h+1)*C'/heads``.
        cache: the layer's ``WeightCache``.
        algorithm: one of ``ALGORITHMS`` or "auto" (timed once per case).

    Returns:
        (B, C', H', W'), equal to the training computation.
    """
    if algorithm == "auto":
        algorithm = pick_algorithm(x, scores, index, weight, cache, stride, padding, dilation)
    elif algorithm not in _FUNCTIONS:
        raise ValueError(f"algorithm must be 'auto' or one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    elif not _applicable(algorithm, x, weight, padding):
        raise ValueError(f"algorithm {algorithm!r} applies to 1x1 convolutions without padding only")
    return _FUNCTIONS[algorithm](x, scores, index, weight, cache, stride, padding, dilation)
