"""A model from its settings: build it by name, then convert it.

The one path from a ``ModelSection`` (which model) and a ``ConvertSection``
(how to convert) to a model, used by the CLI, the trainer and ``bench``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from dgc_convert.recipe import ConvertSection, ModelSection
from dgc_convert.surgery import ConversionReport, convert
from dgc_convert.zoo import create_model

__all__ = ["BuiltModel", "build_model", "create_dense"]


@dataclass
class BuiltModel:
    """What ``build_model`` made: the (converted) model, the conversion report
    (None when conversion is disabled) and, when asked for, the dense original."""

    model: nn.Module
    report: ConversionReport | None
    dense: nn.Module | None = field(default=None, repr=False)


def create_dense(spec: ModelSection, *, num_classes: int | None = None) -> nn.Module:
    """The model ``spec`` names, before conversion (``pretrained`` as it says);
    ``num_classes`` wins over ``spec.num_classes``."""
    classes = num_classes if num_classes is not None else spec.num_classes
    return create_model(spec.name, source=spec.source, num_classes=classes, pretrained=spec.pretrained)


def build_model(
    spec: ModelSection,
    settings: ConvertSection | None,
    *,
    num_classes: int | None = None,
    keep_dense: bool = False,
) -> BuiltModel:
    """Build the model ``spec`` names and convert it with ``settings``.

    Args:
        spec: which model (name, source, class count, pretrained weights).
        settings: how to convert; None or ``enabled: false`` leaves it dense.
        num_classes: classifier width, overriding ``spec.num_classes``.
        keep_dense: also return an untouched copy of the dense model (for MAC
            counts, identity checks and speed baselines).
    """
    model = create_dense(spec, num_classes=num_classes)
    dense = copy.deepcopy(model) if keep_dense else None
    report = convert(model, settings) if settings is not None and settings.enabled else None
    return BuiltModel(model, report, dense)
