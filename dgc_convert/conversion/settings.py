"""The conversion's settings schema: which model to build, how to convert it, per-layer overrides.

The model and convert sections of a recipe, and the one way the CLI and the keyword-argument API
validate them (``build_section``): every bad value is one line naming the setting and what it allows.
Bounds on a model's shape live here too, shared by the recipe schema and saved-model metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, model_validator

from dgc_convert.errors import ConversionError, DGCConvertError, SettingsError, shown
from dgc_convert.nn.settings import (
    MODEL_WIDE_SETTINGS,
    Bound,
    LayerSettings,
    setting_bound,
    setting_choices,
    setting_help,
    setting_type,
    user_settings,
)

__all__ = [
    "Section",
    "ModelSection",
    "ConvertSection",
    "OverrideSection",
    "LayerOverride",
    "build_section",
    "convert_settings",
    "model_settings",
    "MAX_NUM_CLASSES",
    "MAX_INPUT_CHANNELS",
    "MAX_INPUT_SIDE",
]

SectionT = TypeVar("SectionT", bound="Section")

# Bounded inputs, in one place: a model's shape is bounded before anything is built (the recipe
# schema's num_classes and saved-model metadata), so an absurd value is one line, not an allocation
# that takes the machine down.
MAX_NUM_CLASSES = 1_000_000
MAX_INPUT_CHANNELS = 64
MAX_INPUT_SIDE = 8192


def _not_a_boolean(value: Any) -> Any:
    # YAML's `yes` and Python's True are ints to pydantic; a count is never a boolean.
    if isinstance(value, bool):
        raise ValueError("Input should be a valid integer, not a boolean")
    return value


# A whole number that is not a boolean (otherwise pydantic's lax int parsing, and its messages).
Count = Annotated[int, BeforeValidator(_not_a_boolean)]


class Section(BaseModel):
    """A recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """Which model to build."""

    name: str
    source: Literal["auto", "timm", "torchvision"] = "auto"
    num_classes: Count | None = Field(default=None, ge=1, le=MAX_NUM_CLASSES)
    input_size: int | None = Field(
        strict=True, default=None, ge=8, description="square input side in pixels; model default when unset"
    )
    pretrained: bool = Field(default=False, description="download the library's default weights (needs the network)")
    checkpoint: str | None = Field(
        default=None,
        min_length=1,
        description="start from these trained dense weights: a file (files.names.WEIGHTS_SUFFIXES) or a run's "
        "last/ or best/ directory; a relative path is relative to the current working directory",
    )

    @model_validator(mode="after")
    def _one_source_of_weights(self) -> ModelSection:
        if self.pretrained and self.checkpoint is not None:
            raise ValueError(
                "pretrained and checkpoint are both set: start from the library's weights or from "
                f"{shown(self.checkpoint, quoted=False)}, not both"
            )
        return self


def _layer_field(name: str, *, optional: bool) -> tuple[Any, Any]:
    """(annotation, pydantic field) of one ``LayerSettings`` field, read off its type, bound,
    choices, default and help text: the recipe schema never restates a per-layer setting."""
    item = next(item for item in fields(LayerSettings) if item.name == name)
    kind = setting_type(name)
    bound, choices = setting_bound(name), setting_choices(name)
    annotation: Any
    if choices is not None:
        annotation = Literal[choices]  # type: ignore[valid-type]  # a tuple of choices is a Literal's arguments
    elif bound is not None:
        limits = {key: getattr(bound, key) for key in ("ge", "gt", "le", "lt") if getattr(bound, key) is not None}
        annotation = Annotated[Count if bound.integer else kind, Field(**limits)]
    else:
        annotation = kind
    if optional:
        return annotation | None, Field(default=None, description=setting_help(name))
    return annotation, Field(default=item.default, description=setting_help(name))


# The order ``overrides`` has always listed its keys in (error messages show it); settings added
# later follow in declaration order.
_OVERRIDE_ORDER = ("heads", "zeta", "squeeze_ratio", "skip")


def _override_fields() -> dict[str, Any]:
    per_layer = [name for name in user_settings() if name not in MODEL_WIDE_SETTINGS]
    names = [n for n in _OVERRIDE_ORDER if n in per_layer or n == "skip"]
    names += [n for n in per_layer if n not in names]
    return {
        name: (bool | None, Field(default=None, description="true: leave these convolutions dense; false: un-skip"))
        if name == "skip"
        else _layer_field(name, optional=True)
        for name in names
    }


# Built from LayerSettings: every per-layer setting except the model-wide ones, each optional.
_OverrideFields: type[Section] = create_model("_OverrideFields", __base__=Section, **_override_fields())


class OverrideSection(_OverrideFields):  # type: ignore[misc,valid-type]  # fields built from LayerSettings
    """Per-layer settings for the convolutions a glob pattern matches: ``LayerSettings``' all-optional form.

    Every key is tri-state: None leaves the value an earlier pattern (or the
    section) set, so ``{"layer4.*": {skip: true}, "layer4.0.conv1": {zeta:
    0.7}}`` keeps ``layer4.0.conv1`` skipped; ``skip: false`` un-skips.
    Model-wide settings (``gating``) are refused here.
    """

    @model_validator(mode="before")
    @classmethod
    def _model_wide_settings_are_not_per_layer(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            for name, why in MODEL_WIDE_SETTINGS.items():
                if name in value:
                    raise ValueError(f"{name} is model-wide ({why}); set convert.{name} instead")
        return value

    def layer_values(self) -> dict[str, Any]:
        """The per-layer settings this override sets (its non-None keys but ``skip``), by name."""
        return {
            name: value
            for name in type(self).model_fields
            if name != "skip" and (value := getattr(self, name)) is not None
        }


def _convert_fields() -> dict[str, Any]:
    layer = {name: _layer_field(name, optional=False) for name in user_settings()}
    return {
        "enabled": (bool, Field(default=True)),
        **layer,
        "include": (
            list[str],
            Field(default_factory=list, description="glob over module names; only matching convs convert"),
        ),
        "exclude": (list[str], Field(default_factory=list, description="glob over module names to leave dense")),
        "min_channels": (Count, Field(default=16, ge=1, description="fewest input channels worth gating")),
        "overrides": (dict[str, OverrideSection], Field(default_factory=dict)),
    }


# Built from LayerSettings: every per-layer setting with its default, between the conversion's own keys.
_ConvertFields: type[Section] = create_model("_ConvertFields", __base__=Section, **_convert_fields())


class ConvertSection(_ConvertFields):  # type: ignore[misc,valid-type]  # fields built from LayerSettings
    """How to convert: the one settings object of a conversion (CLI, recipes and the API build it).

    ``enabled: false`` trains the dense model the same way (``surgery.convert``
    itself ignores the flag). The per-layer settings (heads, squeeze ratio, zeta,
    gating, preact, squeeze rule) and their defaults are ``LayerSettings``' own,
    so a layer built by hand and one converted here agree. Model-wide settings
    (``gating``: DGC-G's threshold is one value for the whole model) are never
    set in ``overrides``.
    """

    def layer_settings(self) -> LayerSettings:
        """The section's model-wide values of every per-layer setting, as ``LayerSettings``."""
        return LayerSettings(**{name: getattr(self, name) for name in user_settings()})


LayerOverride = OverrideSection  # the API's name for one override


def _constraints(field_info: Any) -> tuple[Any, list[Any]]:
    """(base type, bound objects) of a field, looking through ``X | None`` and ``Annotated``."""
    annotation, metadata = field_info.annotation, list(field_info.metadata)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        annotation = args[0]
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata += list(getattr(item, "metadata", [item]))
    return annotation, metadata


def _allowed(field_info: Any, *, with_kind: bool = True) -> str:
    """What a field accepts, read off its annotation and bounds: 'in [0, 1)', 'a positive integer',
    'a number > 0' ('> 0' without ``with_kind``: a value of the right type out of bounds)."""
    annotation, metadata = _constraints(field_info)
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(c) for c in get_args(annotation))
    bounds: dict[str, Any] = {}
    for bound in metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if getattr(bound, attr, None) is not None:
                bounds[attr] = getattr(bound, attr)
    if bounds and annotation in (int, float):
        return Bound(**bounds, integer=annotation is int).describe(with_kind=with_kind)
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(annotation)
    return kind or f"of type {getattr(annotation, '__name__', annotation)}"


def _settings_message(error: ValidationError, section: type[BaseModel]) -> str:
    """One line for the first error of a section built from keyword arguments or options:
    ``zeta must be in [0, 1), got 1.5``; inside overrides ``layer PATTERN: ...``."""
    detail = error.errors()[0]
    loc = [str(part) for part in detail["loc"]]
    model: type[BaseModel] = section
    prefix = ""
    if loc[:1] == ["overrides"] and len(loc) >= 2:
        prefix, model, loc = f"layer {shown(loc[1], quoted=False)}: ", OverrideSection, loc[2:]
        if detail["type"] == "extra_forbidden":
            return f"{prefix}unknown key {shown(loc[0])}; allowed: {', '.join(model.model_fields)}"
    if not loc:
        return prefix + detail["msg"].removeprefix("Value error, ")
    if detail["type"] == "extra_forbidden":
        return f"unknown setting {shown(loc[0])}; allowed: {', '.join(model.model_fields)}"
    if detail["type"] == "missing":
        return f"{prefix}{shown('.'.join(loc), quoted=False)} is required"
    field_info = model.model_fields.get(loc[0])
    if field_info is None or len(loc) > 1:
        return f"{prefix}{shown('.'.join(loc), quoted=False)}={shown(detail.get('input'))}: {detail['msg'].removeprefix('Value error, ')}"
    out_of_bounds = detail["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
    return f"{prefix}{loc[0]} must be {_allowed(field_info, with_kind=not out_of_bounds)}, got {shown(detail.get('input'))}"


def build_section(
    section: type[SectionT],
    values: Mapping[str, Any],
    *,
    base: SectionT | Mapping[str, Any] | None = None,
    error: type[DGCConvertError] = SettingsError,
) -> SectionT:
    """``base`` (or the schema's defaults) updated with the non-None ``values``, validated.

    How the CLI and the keyword-argument API get the recipe's bounds and
    defaults: a bad value raises ``error`` with one line such as ``zeta must
    be in [0, 1), got 1.5``.
    """
    if base is None:
        data: dict[str, Any] = {}
    elif isinstance(base, Mapping):  # plain data, e.g. a recipe's section before validation
        data = dict(base)
    else:
        data = base.model_dump(exclude_unset=True)
    data.update({key: value for key, value in values.items() if value is not None})
    try:
        return section.model_validate(data)
    except ValidationError as caught:
        raise error(_settings_message(caught, section)) from None


def convert_settings(base: ConvertSection | Mapping[str, Any] | None = None, **values: Any) -> ConvertSection:
    """A validated ``ConvertSection``: ``base`` (or the defaults) with the non-None ``values`` applied.

    Raises ``ConversionError`` naming the bad setting and what it allows.
    """
    return build_section(ConvertSection, values, base=base, error=ConversionError)


def model_settings(base: ModelSection | Mapping[str, Any] | None = None, **values: Any) -> ModelSection:
    """A validated ``ModelSection``: ``base`` with the non-None ``values`` applied; ``SettingsError`` when bad."""
    return build_section(ModelSection, values, base=base, error=SettingsError)
