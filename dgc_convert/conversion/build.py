"""A model from its settings: build it by name, then convert it.

The one path from a ``ModelSection`` (which model) and a ``ConvertSection``
(how to convert) to a model, used by the CLI, the trainer and ``bench``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from dgc_convert.conversion.dense_weights import load_dense_weights
from dgc_convert.conversion.settings import ConvertSection, ModelSection
from dgc_convert.conversion.surgery import ConversionReport, LayerSettings, apply_conversion, convert
from dgc_convert.conversion.zoo import create_model

__all__ = ["BuiltModel", "build_model", "create_dense"]


@dataclass
class BuiltModel:
    """What ``build_model`` made: the (converted) model, the conversion report
    (None when conversion is disabled) and, when asked for, the dense original."""

    model: nn.Module
    report: ConversionReport | None
    dense: nn.Module | None = field(default=None, repr=False)


def create_dense(spec: ModelSection, *, num_classes: int | None = None, load_checkpoint: bool = True) -> nn.Module:
    """The model ``spec`` names, before conversion: with the library's weights
    when ``pretrained``, with the weights of ``spec.checkpoint`` (checked
    strictly, ``load_dense_weights``) unless ``load_checkpoint`` is false (a
    resumed run restores its own weights). ``num_classes`` wins over ``spec.num_classes``."""
    classes = num_classes if num_classes is not None else spec.num_classes
    model = create_model(spec.name, source=spec.source, num_classes=classes, pretrained=spec.pretrained)
    if spec.checkpoint is not None and load_checkpoint:
        load_dense_weights(model, spec.checkpoint)
    return model


def build_model(
    spec: ModelSection,
    settings: ConvertSection | None,
    *,
    num_classes: int | None = None,
    keep_dense: bool = False,
    load_checkpoint: bool = True,
    input_size: int | None = None,
    layers: Mapping[str, LayerSettings] | None = None,
) -> BuiltModel:
    """Build the model ``spec`` names and convert it with ``settings``.

    Args:
        spec: which model (name, source, class count, pretrained weights or a checkpoint to start from).
        settings: how to convert; None or ``enabled: false`` leaves it dense.
        num_classes: classifier width, overriding ``spec.num_classes``.
        keep_dense: also return an untouched copy of the dense model (for MAC
            counts, identity checks and speed baselines).
        load_checkpoint: load ``spec.checkpoint`` into the dense model (false
            when the weights come from elsewhere afterwards: a resumed run).
        input_size: square input side in pixels the conversion weighs each
            layer's MACs at (``surgery.plan_conversion``); ``spec.input_size``,
            else the model's own, when None.
        layers: the conversion to apply, by module name, instead of planning
            one from ``settings`` (a resumed run's saved layers: what an
            earlier version's rules converted stays converted); no report is
            made then (``report`` is None).
    """
    model = create_dense(spec, num_classes=num_classes, load_checkpoint=load_checkpoint)
    dense = copy.deepcopy(model) if keep_dense else None
    size = input_size if input_size is not None else spec.input_size
    report = None
    if settings is not None and settings.enabled:
        if layers is None:
            report = convert(model, settings, input_size=size)
        else:
            apply_conversion(model, layers)
    return BuiltModel(model, report, dense)
