"""MACs per sample (a batch of one) and parameters, counted by torch's ``FlopCounterMode`` with a
DGC counting rule, on a meta-weight copy of the model on fake tensors (any input size, no memory).

What counts how much (products as FLOPs / 2, normalization and average pooling by the
ultralytics-thop convention, DGC layers by ``dgc_layer_macs``): ``docs/measuring.md``,
"Counting MACs".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from dgc_convert.conversion.shapes import convolution_output_sizes, normalize_input_size, run_on_copy
from dgc_convert.nn.layer import DGCConv2d, kept_channel_macs, saliency_macs
from dgc_convert.nn.modes import dgc_mode

__all__ = [
    "LayerMacs",
    "MacReport",
    "count_macs",
    "dgc_layer_macs",
    "dgc_layer_costs",
    "normalize_input_size",
    "convolution_output_sizes",
]


def dgc_layer_macs(layer: DGCConv2d, output_height: int, output_width: int) -> int:
    """MACs per sample of one DGC layer at its current ``zeta_t`` (the method's
    cost formula): per head the two saliency FCs (``2 * C * hidden``) plus the
    convolution over the ``k`` kept channels (``kh * kw * k * C'/H * H' * W'``),
    summed over heads. Pooling, scaling and ReLU (O(C*H*W)) are not counted,
    as they are not counted for dense layers either; nor is the
    pre-activation BatchNorm (and its ReLU) of a ``preact`` layer, also
    O(C*H*W).

    Under network gating (DGC-G) the number of kept channels varies per
    sample and head; ``k`` is the count the model-wide threshold aims at, so
    this is the layer's expected cost at the target, not a fixed one."""
    saliency, per_kept_channel = dgc_layer_costs(layer, output_height, output_width)
    return saliency + layer.heads * layer.kept_channels * per_kept_channel


def dgc_layer_costs(layer: DGCConv2d, output_height: int, output_width: int) -> tuple[int, int]:
    """The two parts of the method's cost formula, MACs per sample: all heads'
    saliency FCs (``H * 2 * C * hidden``), and one head's convolution over one
    kept channel (``kh * kw * C'/H * H' * W'``). Static and realised counts both
    build on these."""
    saliency = saliency_macs(layer.in_channels, layer.heads, layer.saliency_generator.hidden)
    return saliency, kept_channel_macs(layer.kernel_size, layer.out_channels, layer.heads, output_height, output_width)


@dataclass
class LayerMacs:
    """One counted module: dotted name, class name, MACs per sample and its own parameters."""

    name: str
    kind: str
    macs: int
    params: int


LIVE_ACTIVATIONS = 3  # activations of the largest size a forward without gradients holds at once


@dataclass
class MacReport:
    """MACs per sample and parameters of a model at one input size.

    ``layers`` lists the leaf modules and the DGC layers, in module order,
    each with the MACs run inside it. ``total_macs`` also counts the
    functional products run outside them and the rules of non-leaf modules
    (e.g. a norm layer with an activation inside). ``expected`` is True when
    some DGC layer is network-gated (DGC-G): its kept channels vary per
    sample, and the figures are the cost expected at the target.
    ``largest_activation``: bytes of the largest tensor any module returns
    for one sample (what a forward at this size must hold at least).
    ``training_activations``: bytes per sample of every leaf module's and DGC
    layer's output, about what a training step keeps for its backward pass
    (a lower bound: operators between modules keep theirs too).
    """

    input_size: tuple[int, int, int]
    total_macs: int
    total_params: int
    layers: list[LayerMacs] = field(default_factory=list)
    expected: bool = False
    largest_activation: int = 0  # bytes of the largest tensor a module returns, per sample
    training_activations: int = 0  # bytes of all leaf modules' outputs, per sample

    def by_name(self) -> dict[str, LayerMacs]:
        return {layer.name: layer for layer in self.layers}

    def forward_memory(self, batch_size: int) -> int:
        """About the bytes a forward without gradients holds at once at ``batch_size``: its input,
        and its largest activation ``LIVE_ACTIVATIONS`` times (a layer's input, output and a residual)."""
        channels, height, width = self.input_size
        return batch_size * (4 * channels * height * width + LIVE_ACTIVATIONS * self.largest_activation)

    def macs_of(self, *kinds: type[nn.Module], model: nn.Module) -> int:
        """MACs per sample of the layers of ``model`` that are instances of ``kinds``."""
        modules = dict(model.named_modules())
        return sum(layer.macs for layer in self.layers if isinstance(modules.get(layer.name), kinds))

    def to_dict(self) -> dict:
        return asdict(self)


# --- FLOP formulas torch's registry lacks -------------------------------------------------------
# Both receive shapes (FlopCounterMode's shape wrapper) and return FLOPs (2 per MAC).


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The fused CPU kernel of ``scaled_dot_product_attention``: two batched products."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
    """``nn.MultiheadAttention``'s inference fast path: the q, k and v projections,
    the two attention products over all heads and the output projection."""
    *batch, target, _ = query_shape
    source = key_shape[-2]
    b = math.prod(batch)
    macs = (
        b * embed_dim * embed_dim * (2 * target + 2 * source)
    )  # projections: q and out over target, k and v over source
    macs += 2 * b * target * source * embed_dim  # q k^T and attn v
    return 2 * macs


def _extra_formulas() -> dict:
    aten = torch.ops.aten
    formulas = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_attention_flops),
        ("_native_multi_head_attention", _native_mha_flops),
    ):
        if hasattr(aten, name):  # both exist from torch 2.2; kept optional for older builds
            formulas[getattr(aten, name)] = formula
    return formulas


# --- module rules for what is not a product -----------------------------------------------------

_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_POOLED_DIMS = {
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
}


def _has_rule(module: nn.Module) -> bool:
    return isinstance(module, _NORMS + _AVG_POOLS + _ADAPTIVE_AVG_POOLS)


def _pooled_inputs(sizes: Sequence[int], outputs: Sequence[int], kernel, stride, padding, include_pad: bool) -> int:
    """Input elements summed by an average pool over its pooled dimensions (window sizes clipped to the input,
    or to the padded input when padding counts)."""
    count = 1
    for size, output, k, s, p in zip(sizes, outputs, kernel, stride, padding, strict=True):
        low, high = (-p, size + p) if include_pad else (0, size)
        count *= sum(max(0, min(i * s - p + k, high) - max(i * s - p, low)) for i in range(output))
    return count


def _rule_macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    if isinstance(module, _NORMS):
        affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
        return (4 if affine else 2) * x.numel()
    if isinstance(module, _AVG_POOLS + _ADAPTIVE_AVG_POOLS):
        dims = next(d for kind, d in _POOLED_DIMS.items() if isinstance(module, kind))
        sizes, outputs = x.shape[-dims:], y.shape[-dims:]
        if isinstance(module, _AVG_POOLS):

            def per_dim(value):
                return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims

            pooled = _pooled_inputs(
                sizes,
                outputs,
                per_dim(module.kernel_size),
                per_dim(module.stride or module.kernel_size),
                per_dim(module.padding),
                module.count_include_pad,
            )
        else:
            # output j of an adaptive pool averages inputs [floor(j * I / O), ceil((j + 1) * I / O))
            pooled = math.prod(
                sum(-(-(j + 1) * i // o) - j * i // o for j in range(o)) for i, o in zip(sizes, outputs, strict=True)
            )
        return math.prod(x.shape[:-dims]) * pooled + y.numel()  # one add per pooled input, one divide per output
    return 0


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


class _Tally:
    """Forward hooks that attribute the operator count to modules and apply the module rules."""

    def __init__(self, counter: FlopCounterMode) -> None:
        self.counter = counter
        self.macs: dict[nn.Module, int] = {}  # leaves and DGC layers: MACs run inside, all calls
        self.rule_macs = 0  # norm and pool rules, everywhere but inside DGC layers
        self.dgc_macs = 0  # DGC layers by the method's formula
        self.dgc_flops = 0  # operator FLOPs run inside DGC layers, replaced by dgc_macs
        self._starts: list[int] = []
        self._inside_dgc = 0
        self.largest_output = 0  # bytes of the largest tensor a module returned (per sample: batch 1)
        self.leaf_outputs = 0  # bytes of every leaf module's and DGC layer's output (batch 1)

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._starts.append(self.counter.get_total_flops())
        if isinstance(module, DGCConv2d):
            self._inside_dgc += 1

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        flops = self.counter.get_total_flops() - self._starts.pop()
        if isinstance(output, torch.Tensor):
            size = output.numel() * output.element_size()
            self.largest_output = max(self.largest_output, size)
            leaf = isinstance(module, DGCConv2d) or next(module.children(), None) is None
            if leaf and not any(output is arg for arg in args):  # an in-place op's output is its input
                self.leaf_outputs += size
        if isinstance(module, DGCConv2d):
            self._inside_dgc -= 1
            if self._inside_dgc:
                return
            self.dgc_flops += flops
            macs = dgc_layer_macs(module, output.shape[2], output.shape[3]) * output.shape[0]
            self.dgc_macs += macs
            self.macs[module] = self.macs.get(module, 0) + macs
            return
        if self._inside_dgc:
            return
        macs = flops // 2
        if _has_rule(module):
            x = _first_tensor(args, kwargs)
            if x is not None and isinstance(output, torch.Tensor):
                rule = _rule_macs(module, x, output)
                self.rule_macs += rule
                macs += rule
        if module in self.macs:
            self.macs[module] += macs

    def total(self) -> int:
        return (self.counter.get_total_flops() - self.dgc_flops) // 2 + self.rule_macs + self.dgc_macs


def count_macs(model: nn.Module, input_size: int | Sequence[int]) -> MacReport:
    """Count MACs per sample and parameters of ``model`` on one input of ``input_size``.

    Products are counted by torch's ``FlopCounterMode``; normalization and
    average pooling modules by their rules (see the module docstring); DGC
    layers follow ``dgc_layer_macs`` at their current ``zeta_t`` (the
    expected cost for network-gated layers: the report's ``expected``).
    Counting needs shapes only, and ``model`` itself never runs: see ``shapes.run_on_copy``.
    """
    return run_on_copy(model, input_size, _count)


def _count(model: nn.Module, example: torch.Tensor, *, fake: bool) -> MacReport:
    """``count_macs`` on ``example`` (batch 1), on fake tensors or for real."""
    named = dict(model.named_modules())
    # Reported rows: the leaves and the DGC layers, but nothing inside a DGC layer; not the model itself.
    inside_dgc = {id(sub) for m in named.values() if isinstance(m, DGCConv2d) for sub in m.modules() if sub is not m}
    rows = [
        (name, m)
        for name, m in named.items()
        if name and id(m) not in inside_dgc and (isinstance(m, DGCConv2d) or next(m.children(), None) is None)
    ]
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    tally = _Tally(counter)
    tally.macs = {m: 0 for _, m in rows}
    training = {m: m.training for m in model.modules()}
    handles = []
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    try:
        for m in named.values():
            handles.append(m.register_forward_pre_hook(tally.before, with_kwargs=True))
            handles.append(m.register_forward_hook(tally.after, with_kwargs=True))
        model.eval()
        # Counting needs shapes, not speed: DGC layers run their plain graph form
        # instead of timing their sparse algorithms on this one-off input. The
        # counter is entered last, so it sees every operator before fake tensors run it.
        with mode, dgc_mode(model, algorithm="export"), torch.no_grad(), counter:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        for m, was_training in training.items():
            m.training = was_training
    layers = [
        LayerMacs(name, type(m).__name__, tally.macs[m], sum(p.numel() for p in m.parameters())) for name, m in rows
    ]
    expected = any(isinstance(m, DGCConv2d) and m.gating == "network" for m in named.values())
    size = (int(example.shape[1]), int(example.shape[2]), int(example.shape[3]))
    params = sum(p.numel() for p in model.parameters())
    return MacReport(
        size,
        tally.total(),
        params,
        layers,
        expected=expected,
        largest_activation=tally.largest_output,
        training_activations=tally.leaf_outputs,
    )
