"""Which convolutions become DGC layers, and why the others do not.

Two steps: ``plan_conversion`` decides for every ``nn.Conv2d`` (subclasses
included) and returns per-layer settings; ``apply_conversion`` replaces the
named convolutions. ``convert`` does both, so a model is either fully
converted as reported or left untouched when the settings are bad; ``load``
applies a saved model's per-layer settings directly, so a later change of the
eligibility rules never makes an older file unloadable.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from dgc_convert.conversion.settings import ConvertSection, LayerOverride, convert_settings
from dgc_convert.conversion.shapes import convolution_output_sizes, normalize_input_size
from dgc_convert.conversion.skip_reasons import SkipReason
from dgc_convert.conversion.tracing import image_convolutions
from dgc_convert.conversion.zoo import model_info
from dgc_convert.errors import ConversionError, IdentityCheckError, first_line
from dgc_convert.nn.conv_kinds import conv_kind
from dgc_convert.nn.layer import (
    DGCConv2d,
    kept_channel_count,
    kept_channel_macs,
    saliency_hidden_width,
    saliency_macs,
    static_padding,
)
from dgc_convert.nn.modes import dgc_mode, find_dgc_layers
from dgc_convert.nn.settings import LayerSettings, SettingsFields

__all__ = [
    "LayerDecision",
    "LayerSettings",
    "ConversionReport",
    "LayerOverride",
    "SkipReason",
    "convert",
    "plan_conversion",
    "apply_conversion",
    "stem_convolutions",
    "dgc_layers",
    "set_zeta",
    "sparsity_loss",
    "check_identity",
]


@dataclass
class LayerDecision(SettingsFields):
    """One convolution of the model: its geometry and what happened to it.

    ``status`` is "converted" or "skipped"; ``skip_reason`` is why it was
    skipped (None when converted) and ``detail`` the layer's figures behind
    it; ``reason`` is the two as one line to read (empty when converted).
    ``settings`` are the converted layer's (None when skipped), each also read
    as the decision's own attribute (``decision.heads``). ``kept`` is k, the
    input channels each head keeps per sample at ``zeta`` (under network
    gating, the number the model-wide threshold aims at on average).
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    status: str
    skip_reason: SkipReason | None = None
    detail: str = ""
    settings: LayerSettings | None = None
    kept: int | None = None

    @property
    def converted(self) -> bool:
        return self.status == "converted"

    @property
    def reason(self) -> str:
        """Why the layer was skipped, as the table and ``--json`` show it (empty when converted)."""
        return "" if self.skip_reason is None else self.skip_reason.text(self.detail)

    def to_dict(self) -> dict[str, Any]:
        """The decision as JSON-ready data: the geometry and status, ``reason`` (the line to read)
        in place of ``skip_reason`` and ``detail``, every user setting by name (None when skipped)
        and ``kept``."""
        data: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "skip_reason":
                data["reason"] = self.reason
            elif key == "settings":
                data.update(self.settings_dict())
            elif key != "detail":
                data[key] = value
        return data


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

    def layer_settings(self) -> dict[str, LayerSettings]:
        """Module name -> settings of every layer to convert: the input of ``apply_conversion``."""
        return {d.name: d.settings for d in self.layers if d.settings is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [d.to_dict() for d in self.layers]}

    def __str__(self) -> str:
        return f"ConversionReport({len(self.converted)} of {len(self.layers)} convolutions converted)"


# Why a convolution stays dense, with the layer's figures behind it; None when it can convert.
Skip = tuple[SkipReason, str]


def _reason_to_skip(conv: nn.Conv2d, heads: int, min_channels: int, is_stem: bool) -> Skip | None:
    """Why ``conv`` stays dense under these settings; None when it can convert."""
    if conv_kind(conv) is None:
        return SkipReason.CUSTOM_FORWARD, type(conv).__name__
    if is_stem:
        return SkipReason.STEM, ""
    if conv.groups != 1:
        return SkipReason.GROUPED, f"groups={conv.groups}"
    if conv.padding_mode != "zeros":
        return SkipReason.PADDING_MODE, f"padding_mode={conv.padding_mode!r}"
    if static_padding(conv) is None:
        return SkipReason.ASYMMETRIC_PADDING, f"padding={conv.padding!r}"
    if conv.in_channels < min_channels:
        return SkipReason.TOO_FEW_CHANNELS, f"in_channels={conv.in_channels} < min_channels={min_channels}"
    if conv.out_channels % heads:
        return SkipReason.HEADS_DO_NOT_DIVIDE, f"out_channels={conv.out_channels} not divisible by heads={heads}"
    return None


def _reason_no_saving(
    conv: nn.Conv2d, heads: int, zeta: float, squeeze_ratio: float, rule: str, output_size: tuple[int, int]
) -> Skip | None:
    """Why ``conv`` would cost at least as much as a DGC layer at its feature size (the
    method's cost formula, saliency generators included); None when DGC saves MACs."""
    kernel = (conv.kernel_size[0], conv.kernel_size[1])
    per_channel = kept_channel_macs(kernel, conv.out_channels, heads, *output_size)
    hidden = saliency_hidden_width(conv.in_channels, squeeze_ratio, rule)
    dgc = (
        saliency_macs(conv.in_channels, heads, hidden)
        + heads * kept_channel_count(conv.in_channels, zeta) * per_channel
    )
    dense = heads * conv.in_channels * per_channel
    if dgc < dense:
        return None
    height, width = output_size
    return SkipReason.NO_SAVING, f"{dgc:,} MACs per sample against {dense:,} dense, at its {height}x{width} output"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _convolutions(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def stem_convolutions(model: nn.Module) -> set[str]:
    """Names of the convolutions that see the image, read from a ``torch.fx``
    trace; when the model cannot be traced, the first ``nn.Conv2d`` in
    registration order."""
    found = image_convolutions(model)
    if found is not None:
        return found
    convs = _convolutions(model)
    return {convs[0][0]} if convs else set()


def _display_name(model: nn.Module) -> str:
    info = model_info(model)
    return info.name if info is not None else type(model).__name__


def _output_sizes(
    model: nn.Module, convs: list[tuple[str, nn.Conv2d]], stems: set[str], input_size: int | tuple[int, ...] | None
) -> dict[str, tuple[int, int]]:
    """Every convolution's output size at ``input_size``: by default the model's own
    (``create_model``'s), else 224 square; a stem's input channels where the size names none."""
    if not convs:
        return {}
    info = model_info(model)
    # An input_size without channels (N or (H, W)) takes a stem's: a grey-scale model needs no (1, H, W).
    channels = next((conv.in_channels for name, conv in convs if name in stems), convs[0][1].in_channels)
    if input_size is not None:
        size = normalize_input_size(input_size, channels)
    elif info is not None:
        size = info.input_size
    else:
        size = normalize_input_size(224, channels)
    try:
        return convolution_output_sizes(model, size)
    except Exception as error:  # the model's own failure on this input: say which input, and how to pick another
        raise ConversionError(
            f"{_display_name(model)} cannot run on a {'x'.join(map(str, size))} input to find its feature sizes "
            f"({first_line(error)}); pass input_size"
        ) from None


def plan_conversion(
    model: nn.Module, settings: ConvertSection, *, input_size: int | tuple[int, ...] | None = None
) -> ConversionReport:
    """Decide, for every ``nn.Conv2d`` of ``model`` (subclasses included), whether
    it converts and with which settings, without changing the model.

    Later override patterns win key by key; a key an override leaves unset
    (None) keeps the value set before it, ``skip`` included. ``gating`` is
    the section's for every layer (overrides cannot set it).

    Never at a loss: a convolution that would cost at least as many MACs per
    sample as a DGC layer (saliency generators included, at its output size
    for one input of ``input_size``) as it does dense stays dense, with the
    reason, unless an override names it exactly (its pattern is the layer's
    name) or sets ``skip: false`` for it. ``input_size``: N, (H, W) or
    (C, H, W); the model's own (``create_model``'s) when None, else 224.
    Feature sizes come from one shape-only run of the model
    (``convolution_output_sizes``); a convolution that run does not reach is
    judged by nothing but the other rules.

    Raises:
        ConversionError: an include, exclude or override pattern that matches
            no convolution.
    """
    convs = _convolutions(model)
    names = [n for n, _ in convs]
    for kind, patterns in (
        ("include", settings.include),
        ("exclude", settings.exclude),
        ("overrides", settings.overrides),
    ):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ConversionError(f"{kind} pattern {pattern!r} matches no convolution of the model")
    stems = stem_convolutions(model)
    output_sizes = _output_sizes(model, convs, stems, input_size)
    report = ConversionReport()
    section_layer = settings.layer_settings()
    for name, conv in convs:
        layer = section_layer
        skip: Skip | None = None
        named = unskipped = False  # what lets a layer convert at a loss
        for pattern, override in settings.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                layer = replace(layer, **override.layer_values())  # later patterns win, key by key
                named = named or pattern == name
                if override.skip is not None:
                    skip = (SkipReason.OVERRIDE, repr(pattern)) if override.skip else None
                    unskipped = not override.skip
        if settings.include and not _matches(name, settings.include):
            skip = SkipReason.NOT_INCLUDED, ""
        elif _matches(name, settings.exclude):
            skip = SkipReason.EXCLUDED, ""
        if skip is None:
            skip = _reason_to_skip(conv, layer.heads, settings.min_channels, is_stem=name in stems)
        if skip is None and not (named or unskipped) and name in output_sizes:
            skip = _reason_no_saving(
                conv, layer.heads, layer.zeta, layer.squeeze_ratio, layer.squeeze_rule, output_sizes[name]
            )
        decision = LayerDecision(
            name=name,
            kind=type(conv).__name__,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=(conv.kernel_size[0], conv.kernel_size[1]),
            stride=(conv.stride[0], conv.stride[1]),
            groups=conv.groups,
            status="converted" if skip is None else "skipped",
            skip_reason=None if skip is None else skip[0],
            detail="" if skip is None else skip[1],
        )
        if skip is None:
            decision.settings = layer
            decision.kept = kept_channel_count(conv.in_channels, layer.zeta)
        report.layers.append(decision)
    return report


def apply_conversion(model: nn.Module, layers: Mapping[str, LayerSettings]) -> None:
    """Replace the named convolutions of ``model`` with ``DGCConv2d`` layers, in place.

    No eligibility rule is consulted: this is how a saved model is rebuilt
    whatever today's rules say. Every layer is built before any is swapped in,
    so a failure leaves the model untouched. A convolution shared by several
    parents is replaced under every name.

    Raises:
        ConversionError: a name that is not a plain-enough ``nn.Conv2d`` of
            ``model`` (missing, grouped, asymmetric padding, ...).
    """
    replacements: dict[int, DGCConv2d] = {}
    for name, layer in layers.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise ConversionError(f"layer {name}: no such module in the model") from None
        if not isinstance(conv, nn.Conv2d):
            raise ConversionError(f"layer {name}: a {type(conv).__name__}, not an nn.Conv2d")
        try:
            replacements[id(conv)] = DGCConv2d.from_conv(conv, layer)
        except ValueError as error:
            raise ConversionError(f"layer {name}: {error}") from None
    for parent in model.modules():
        # _modules, not named_children(): the latter hides a second reference
        # to the same child within one parent.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])


def convert(
    model: nn.Module,
    settings: ConvertSection | None = None,
    *,
    heads: int | None = None,
    zeta: float | None = None,
    squeeze_ratio: float | None = None,
    gating: str | None = None,
    preact: bool | None = None,
    squeeze_rule: str | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    min_channels: int | None = None,
    overrides: Mapping[str, LayerOverride | Mapping[str, Any]] | None = None,
    input_size: int | tuple[int, ...] | None = None,
) -> ConversionReport:
    """Replace the eligible convolutions of ``model`` with ``DGCConv2d``, in place.

    A convolution is eligible when its forward is ``nn.Conv2d``'s own or one
    a DGC layer reproduces (timm's weight-standardised and TF-'SAME'
    convolutions, ``nn.conv_kinds``), it is not a stem (a convolution that
    sees the image, found by tracing the model), ``groups == 1``, its padding
    is zeros (and symmetric, unless TF-'SAME'), ``in_channels >=
    min_channels``, ``heads`` divides ``out_channels``, and the DGC layer
    would cost fewer MACs per sample than the convolution at its output size
    for ``input_size`` (see ``plan_conversion``: an override naming the layer
    overrules this last rule).
    Module names and the rest of the model are untouched; weights and biases
    are copied into the new layers.

    Args:
        settings: a ``ConvertSection`` (the recipe's ``convert`` section);
            the schema's defaults when None. ``enabled`` is not consulted.
        heads, zeta, squeeze_ratio, gating, preact, squeeze_rule, include,
        exclude, min_channels, overrides:
            convenience keywords applied on top of ``settings``; validated by
            the same schema. ``gating`` ("head" or "network", DGC-G) is
            model-wide; ``preact`` gives each layer its own BatchNorm + ReLU
            in front; ``squeeze_rule`` ("standard" or "authors") sets the
            saliency generators' width and init (see ``DGCConv2d``).
            ``overrides`` maps a glob pattern over module names to a
            ``LayerOverride`` (or a mapping of heads / zeta / squeeze_ratio /
            skip / preact / squeeze_rule); later patterns win, key by key.
        input_size: the input the MAC comparison is made at: N, (H, W) or
            (C, H, W); the model's own when None (``plan_conversion``).

    Returns:
        A ``ConversionReport`` with one row per convolution, converted or the
        reason it was skipped.

    Raises:
        ConversionError: bad settings, a pattern that matches no convolution,
            or no convolution that can be converted (the model is untouched).
    """
    already = sum(isinstance(m, DGCConv2d) for m in model.modules())
    if already:
        model_name = _display_name(model)
        raise ConversionError(f"{model_name} is already converted ({already} DGC layers); convert the dense model once")
    settings = convert_settings(
        settings,
        heads=heads,
        zeta=zeta,
        squeeze_ratio=squeeze_ratio,
        gating=gating,
        preact=preact,
        squeeze_rule=squeeze_rule,
        include=None if include is None else list(include),
        exclude=None if exclude is None else list(exclude),
        min_channels=min_channels,
        overrides=None if overrides is None else dict(overrides),
    )
    report = plan_conversion(model, settings, input_size=input_size)
    if not report.converted:
        why = "; ".join(sorted({d.skip_reason.value for d in report.skipped if d.skip_reason})) or "it has no nn.Conv2d"
        model_name = _display_name(model)
        raise ConversionError(f"no convolution of {model_name} can be converted ({why})")
    apply_conversion(model, report.layer_settings())
    return report


def dgc_layers(model: nn.Module) -> list[tuple[str, DGCConv2d]]:
    """(name, layer) for every DGC layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DGCConv2d)]


def set_zeta(
    model: nn.Module | Iterable[DGCConv2d], zeta_t: float | None = None, *, fraction: float | None = None
) -> None:
    """Set the current pruning ratio of every DGC layer of ``model`` (or of a list of layers).

    Pass ``zeta_t`` to set one ratio everywhere, or ``fraction`` in [0, 1] to
    set each layer to that fraction of its own target ``zeta`` (how the
    training schedule moves layers with per-layer targets together). A layer
    already at its ratio is left alone: a training loop calls this every
    iteration, and the write would otherwise touch every buffer each step.
    """
    if (zeta_t is None) == (fraction is None):
        raise ValueError("pass exactly one of zeta_t or fraction")
    for layer in find_dgc_layers(model):
        value = zeta_t if zeta_t is not None else layer.zeta * (fraction or 0.0)
        if layer.zeta_t_value != value:
            layer.set_zeta_t(value)


def sparsity_loss(model: nn.Module | Iterable[DGCConv2d]) -> Tensor:
    """Sum of the sparsity terms of every DGC layer's last forward (0 when none ran);
    ``model`` may also be a list of layers."""
    terms = [layer.sparsity_loss for layer in find_dgc_layers(model) if layer.sparsity_loss is not None]
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

    Pre-activation layers (``preact``) make the converted model a different
    architecture on purpose: such a layer computes ``conv(relu(norm(x)))``.
    The check then compares against a reference built from a deep copy of
    ``original`` in which every convolution converted to a ``preact`` layer
    becomes ``nn.Sequential(copy of the layer's norm, nn.ReLU(), the
    convolution)``, so it stays exact: each DGC layer at zeta 0 with unit
    scores must equal its norm, ReLU and dense convolution (norms in eval
    mode, on their running statistics). ``original`` itself is not changed.
    Network-gated layers (DGC-G) keep every channel at zeta_t = 0, so they
    need nothing of the kind.

    Returns:
        The largest absolute difference of the outputs.

    Raises:
        IdentityCheckError: the difference exceeds ``tolerance`` (default
            1e-10 for float64, else 1e-4 times the output's largest magnitude,
            at least 1e-4).
    """
    reference = _preact_reference(original, converted)
    modes = [(m, m.training) for m in (reference, converted)]
    # The training computation ("masked"): the check is about the conversion,
    # and timing the sparse algorithms of every layer would cost seconds.
    try:
        with dgc_mode(converted, algorithm="masked", unit_scores=True, zeta_t=0.0), torch.no_grad():
            reference.eval()
            converted.eval()
            expected = _first_tensor(reference(example_input))
            got = _first_tensor(converted(example_input))
    finally:
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


def _preact_reference(original: nn.Module, converted: nn.Module) -> nn.Module:
    """``original``, or, when ``converted`` has ``preact`` layers, a deep copy of it in
    which each of their convolutions is preceded by a copy of the layer's norm and a ReLU."""
    # Every name of every pre-activation layer (a shared convolution has several).
    names = [
        (name, module)
        for name, module in converted.named_modules(remove_duplicate=False)
        if isinstance(module, DGCConv2d) and module.norm is not None
    ]
    if not names:
        return original
    reference = copy.deepcopy(original)
    built: dict[int, nn.Sequential] = {}  # by the copied convolution: a shared one stays shared
    for name, layer in names:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = reference.get_submodule(parent_name)
            conv = parent.get_submodule(child)
        except AttributeError:
            conv = None
        if not isinstance(conv, nn.Conv2d):
            raise IdentityCheckError(f"converted layer {name} has no convolution {name} in the original model")
        if id(conv) not in built:
            assert layer.norm is not None  # selected above
            built[id(conv)] = nn.Sequential(copy.deepcopy(layer.norm), nn.ReLU(), conv)
        setattr(parent, child, built[id(conv)])
    return reference


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    if isinstance(output, Mapping):
        return _first_tensor(next(iter(output.values())))
    raise TypeError(f"model output of type {type(output).__name__} holds no tensor")
