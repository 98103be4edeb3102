"""MAC and parameter counting through thop, with a DGC counting rule.

All MAC figures are multiply-accumulates per sample (batch of one).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import thop
import torch
from torch import nn

from dgc_convert.nn.layer import DGCConv2d

__all__ = ["LayerMacs", "MacReport", "count_macs", "dgc_layer_macs", "normalize_input_size"]


def dgc_layer_macs(layer: DGCConv2d, output_height: int, output_width: int) -> int:
    """MACs per sample of one DGC layer at its current ``zeta_t`` (the method's
    cost formula): per head the two saliency FCs (``2 * C * hidden``) plus the
    convolution over the ``k`` kept channels (``kh * kw * k * C'/H * H' * W'``),
    summed over heads. Pooling, scaling and ReLU (O(C*H*W)) are not counted,
    as thop does not count them for dense layers either."""
    kh, kw = layer.kernel_size
    saliency = 2 * layer.in_channels * layer.saliency_generator.hidden
    conv = kh * kw * layer.kept_channels * (layer.out_channels // layer.heads) * output_height * output_width
    return layer.heads * (saliency + conv)


def _count_dgc(layer: DGCConv2d, inputs: tuple, output: torch.Tensor) -> None:
    per_sample = dgc_layer_macs(layer, output.shape[2], output.shape[3])
    layer.total_ops += per_sample * output.shape[0]


@dataclass
class LayerMacs:
    """One counted module: dotted name, class name, MACs per sample and its own parameters."""

    name: str
    kind: str
    macs: int
    params: int


@dataclass
class MacReport:
    """MACs per sample and parameters of a model at one input size.

    ``layers`` lists the modules thop has a counting rule for (leaves and DGC
    layers), in module order. ``total_macs`` also counts the functional
    products thop sees outside modules.
    """

    input_size: tuple[int, int, int]
    total_macs: int
    total_params: int
    layers: list[LayerMacs] = field(default_factory=list)

    def by_name(self) -> dict[str, LayerMacs]:
        return {layer.name: layer for layer in self.layers}

    def macs_of(self, *kinds: type[nn.Module], model: nn.Module) -> int:
        """MACs per sample of the layers of ``model`` that are instances of ``kinds``."""
        modules = dict(model.named_modules())
        return sum(layer.macs for layer in self.layers if isinstance(modules.get(layer.name), kinds))

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_input_size(input_size: int | Sequence[int], channels: int = 3) -> tuple[int, int, int]:
    """(channels, height, width) from an int (square), (height, width) or (channels, height, width)."""
    if isinstance(input_size, int):
        size = (channels, input_size, input_size)
    else:
        size = tuple(int(v) for v in input_size)
        if len(size) == 2:
            size = (channels, *size)
    if len(size) != 3 or any(v < 1 for v in size):
        raise ValueError(f"input_size must be N, (H, W) or (C, H, W) of positive ints, got {input_size!r}")
    return size  # type: ignore[return-value]


def count_macs(model: nn.Module, input_size: int | Sequence[int]) -> MacReport:
    """Count MACs per sample and parameters of ``model`` on one input of ``input_size``.

    thop counts every module it has a rule for; DGC layers follow
    ``dgc_layer_macs`` at their current ``zeta_t``. The model runs once in
    eval mode without gradients and is returned to its previous mode.
    """
    size = normalize_input_size(input_size)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    example = torch.zeros(1, *size, device=device, dtype=dtype)
    # Counting needs shapes, not speed: DGC layers run their plain graph form
    # instead of timing their sparse algorithms on this one-off input.
    layers_and_algorithms = [(m, m.inference_algorithm) for m in model.modules() if isinstance(m, DGCConv2d)]
    for layer, _ in layers_and_algorithms:
        layer.inference_algorithm = "export"
    try:
        # thop prints a line per module type it does not know; keep our output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            total, _params, tree = thop.profile(
                model, inputs=(example,), custom_ops={DGCConv2d: _count_dgc}, verbose=False, ret_layer_info=True
            )
    finally:
        for layer, algorithm in layers_and_algorithms:
            layer.inference_algorithm = algorithm
    layers: list[LayerMacs] = []
    _flatten(tree, "", dict(model.named_modules()), layers)
    return MacReport(size, int(round(total)), sum(p.numel() for p in model.parameters()), layers)


def _flatten(tree: dict, prefix: str, modules: dict[str, nn.Module], out: list[LayerMacs]) -> None:
    for child_name, (macs, params, children) in tree.items():
        name = f"{prefix}{child_name}"
        module = modules.get(name)
        if isinstance(module, DGCConv2d) or not children:
            if module is not None:
                out.append(LayerMacs(name, type(module).__name__, int(round(macs)), int(params)))
            continue
        _flatten(children, f"{name}.", modules, out)
