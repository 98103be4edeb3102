"""Which convolutions become DGC layers, and why the others do not.

``convert`` decides for every ``nn.Conv2d`` (subclasses included) first, then
replaces the eligible ones in place, so a model is either fully converted as
reported or left untouched when the settings are bad.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dgc_convert.errors import ConversionError, IdentityCheckError
from dgc_convert.nn.layer import DGCConv2d, kept_channel_count, static_padding

__all__ = [
    "LayerDecision",
    "ConversionReport",
    "LayerOverride",
    "convert",
    "dgc_layers",
    "set_zeta",
    "sparsity_loss",
    "check_identity",
]

OVERRIDE_KEYS = ("heads", "zeta", "squeeze_ratio", "skip")


@dataclass
class LayerOverride:
    """Per-layer settings for the convs a glob pattern matches; None keeps the default."""

    heads: int | None = None
    zeta: float | None = None
    squeeze_ratio: float | None = None
    skip: bool = False


@dataclass
class LayerDecision:
    """One convolution of the model: its geometry and what happened to it.

    ``status`` is "converted" or "skipped"; ``reason`` says why it was
    skipped (empty when converted). ``kept`` is k, the input channels each
    head keeps per sample at ``zeta``.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    status: str
    reason: str = ""
    heads: int | None = None
    zeta: float | None = None
    squeeze_ratio: float | None = None
    kept: int | None = None

    @property
    def converted(self) -> bool:
        return self.status == "converted"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ConversionReport:
    """One ``LayerDecision`` per convolution, in module order."""

    layers: list[LayerDecision] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.converted]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.layers if not d.converted]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [d.to_dict() for d in self.layers]}

    def __str__(self) -> str:
        return f"ConversionReport({len(self.converted)} of {len(self.layers)} convolutions converted)"


def _check_settings(where: str, heads: Any, zeta: Any, squeeze_ratio: Any) -> None:
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise ConversionError(f"{where}heads must be a positive integer, got {heads!r}")
    if not isinstance(zeta, (int, float)) or isinstance(zeta, bool) or math.isnan(zeta) or not 0 <= zeta < 1:
        raise ConversionError(f"{where}zeta must be in [0, 1), got {zeta!r}")
    if not isinstance(squeeze_ratio, (int, float)) or isinstance(squeeze_ratio, bool) or not squeeze_ratio >= 1:
        raise ConversionError(f"{where}squeeze_ratio must be >= 1, got {squeeze_ratio!r}")


def _as_override(pattern: str, value: Any) -> LayerOverride:
    if isinstance(value, LayerOverride):
        return value
    if hasattr(value, "model_dump"):  # a pydantic model from a recipe
        value = value.model_dump()
    if not isinstance(value, Mapping):
        raise ConversionError(f"override {pattern!r}: expected a mapping of {', '.join(OVERRIDE_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(OVERRIDE_KEYS))
    if unknown:
        raise ConversionError(f"override {pattern!r}: unknown key {unknown[0]!r}; allowed: {', '.join(OVERRIDE_KEYS)}")
    return LayerOverride(**value)


def _reason_to_skip(
    name: str, conv: nn.Conv2d, heads: int, min_channels: int, is_stem: bool
) -> str:
    kind = type(conv).__name__
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{kind} overrides nn.Conv2d.forward (its weight or padding is computed on the fly)"
    if is_stem:
        return "stem: sees the image"
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zeros)"
    if static_padding(conv) is None:
        return f"padding={conv.padding!r} pads asymmetrically"
    if conv.in_channels < min_channels:
        return f"in_channels={conv.in_channels} < min_channels={min_channels}"
    if conv.out_channels % heads:
        return f"out_channels={conv.out_channels} not divisible by heads={heads}"
    return ""


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def convert(
    model: nn.Module,
    *,
    heads: int = 4,
    zeta: float = 0.5,
    squeeze_ratio: float = 16,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    min_channels: int = 16,
    overrides: Mapping[str, LayerOverride | Mapping[str, Any]] | None = None,
) -> ConversionReport:
    """Replace the eligible convolutions of ``model`` with ``DGCConv2d``, in place.

    A convolution is eligible when its forward is ``nn.Conv2d``'s own, it is
    not the stem (the first convolution, which sees the image), ``groups ==
    1``, its padding is zeros (and symmetric), ``in_channels >= min_channels``
    and ``heads`` divides ``out_channels``. Module names and the rest of the
    model are untouched; weights and biases are copied into the new layers.

    Args:
        heads, zeta, squeeze_ratio: DGC settings for every converted layer.
        include: glob patterns over module names; only matching convs convert.
        exclude: glob patterns; matching convs are left alone.
        min_channels: the fewest input channels worth gating.
        overrides: glob pattern -> ``LayerOverride`` (or a mapping with
            heads/zeta/squeeze_ratio/skip) for the matching convs; later
            patterns win.

    Returns:
        A ``ConversionReport`` with one row per convolution, converted or the
        reason it was skipped.

    Raises:
        ConversionError: bad settings, a pattern that matches no convolution,
            or no convolution that can be converted (the model is untouched).
    """
    _check_settings("", heads, zeta, squeeze_ratio)
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ConversionError(f"min_channels must be a positive integer, got {min_channels!r}")
    include = list(include or [])
    exclude = list(exclude or [])
    parsed_overrides = {p: _as_override(p, v) for p, v in (overrides or {}).items()}

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = [n for n, _ in convs]
    for kind, patterns in (("include", include), ("exclude", exclude), ("overrides", parsed_overrides)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ConversionError(f"{kind} pattern {pattern!r} matches no convolution of the model")

    report = ConversionReport()
    replacements: dict[int, DGCConv2d] = {}
    for index, (name, conv) in enumerate(convs):
        layer_heads, layer_zeta, layer_ratio, skip = heads, zeta, squeeze_ratio, ""
        for pattern, override in parsed_overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                layer_heads = override.heads if override.heads is not None else layer_heads
                layer_zeta = override.zeta if override.zeta is not None else layer_zeta
                layer_ratio = override.squeeze_ratio if override.squeeze_ratio is not None else layer_ratio
                skip = f"override {pattern!r} says skip" if override.skip else ""
        _check_settings(f"layer {name}: ", layer_heads, layer_zeta, layer_ratio)
        if include and not _matches(name, include):
            skip = "not matched by include"
        elif _matches(name, exclude):
            skip = "matched by exclude"
        if not skip:
            skip = _reason_to_skip(name, conv, layer_heads, min_channels, is_stem=index == 0)
        decision = LayerDecision(
            name=name,
            kind=type(conv).__name__,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            groups=conv.groups,
            status="skipped" if skip else "converted",
            reason=skip,
        )
        if not skip:
            decision.heads, decision.zeta, decision.squeeze_ratio = layer_heads, float(layer_zeta), layer_ratio
            decision.kept = kept_channel_count(conv.in_channels, layer_zeta)
            replacements[id(conv)] = DGCConv2d.from_conv(conv, heads=layer_heads, squeeze_ratio=layer_ratio, zeta=layer_zeta)
        report.layers.append(decision)

    if not replacements:
        why = "; ".join(sorted({d.reason.split(" (")[0] for d in report.skipped})) or "it has no nn.Conv2d"
        model_name = getattr(getattr(model, "dgc_model_info", None), "name", type(model).__name__)
        raise ConversionError(f"no convolution of {model_name} can be converted ({why})")

    # A conv shared by several parents is replaced under every name.
    for parent in model.modules():
        # _modules, not named_children(): the latter hides a second reference
        # to the same child within one parent.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return report


def dgc_layers(model: nn.Module) -> list[tuple[str, DGCConv2d]]:
    """(name, layer) for every DGC layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DGCConv2d)]


def _layers_of(model_or_layers: nn.Module | Iterable[DGCConv2d]) -> Iterable[DGCConv2d]:
    # A training loop passes the layer list it found once, not the model to search every step.
    if isinstance(model_or_layers, nn.Module):
        return [layer for _, layer in dgc_layers(model_or_layers)]
    return model_or_layers


def set_zeta(
    model: nn.Module | Iterable[DGCConv2d], zeta_t: float | None = None, *, fraction: float | None = None
) -> None:
    """Set the current pruning ratio of every DGC layer of ``model`` (or of a list of layers).

    Pass ``zeta_t`` to set one ratio everywhere, or ``fraction`` in [0, 1] to
    set each layer to that fraction of its own target ``zeta`` (how the
    training schedule moves layers with per-layer targets together).
    """
    if (zeta_t is None) == (fraction is None):
        raise ValueError("pass exactly one of zeta_t or fraction")
    for layer in _layers_of(model):
        layer.set_zeta_t(zeta_t if zeta_t is not None else layer.zeta * fraction)


def sparsity_loss(model: nn.Module | Iterable[DGCConv2d]) -> Tensor:
    """Sum of the sparsity terms of every DGC layer's last forward (0 when none ran);
    ``model`` may also be a list of layers."""
    terms = [layer.sparsity_loss for layer in _layers_of(model) if layer.sparsity_loss is not None]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.float() for t in terms]).sum()


def check_identity(
    original: nn.Module,
    converted: nn.Module,
    example_input: Tensor,
    *,
    tolerance: float | None = None,
) -> float:
    """Check that ``converted`` reproduces ``original`` with zeta_t = 0 and unit scores.

    Both models run in eval mode without gradients; every DGC layer is set to
    keep all channels with score 1, on its training computation, for the
    check and restored afterwards.

    Returns:
        The largest absolute difference of the outputs.

    Raises:
        IdentityCheckError: the difference exceeds ``tolerance`` (default
            1e-10 for float64, else 1e-4 times the output's largest magnitude,
            at least 1e-4).
    """
    layers = [layer for _, layer in dgc_layers(converted)]
    saved = [(layer.unit_scores, float(layer.zeta_t), layer.inference_algorithm) for layer in layers]
    modes = [(m, m.training) for m in (original, converted)]
    try:
        for layer in layers:
            layer.unit_scores = True
            layer.set_zeta_t(0.0)
            # The training computation: the check is about the conversion, and
            # timing the sparse algorithms of every layer would cost seconds.
            layer.inference_algorithm = "masked"
        original.eval()
        converted.eval()
        with torch.no_grad():
            expected = _first_tensor(original(example_input))
            got = _first_tensor(converted(example_input))
    finally:
        for layer, (unit, zeta_t, algorithm) in zip(layers, saved):
            layer.unit_scores = unit
            layer.set_zeta_t(zeta_t)
            layer.inference_algorithm = algorithm
        for module, training in modes:
            module.train(training)
    difference = (got.double() - expected.double()).abs().max().item()
    if tolerance is None:
        if expected.dtype == torch.float64:
            tolerance = 1e-10
        else:
            tolerance = max(1e-4, 1e-4 * expected.abs().max().item())
    if not difference <= tolerance:
        raise IdentityCheckError(
            f"converted model differs from the original by {difference:.3g} (tolerance {tolerance:.3g}) "
            "at zeta 0 with unit scores"
        )
    return difference


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    if isinstance(output, Mapping):
        return _first_tensor(next(iter(output.values())))
    raise TypeError(f"model output of type {type(output).__name__} holds no tensor")
