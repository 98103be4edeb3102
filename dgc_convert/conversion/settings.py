"""The conversion's settings schema: which model to build, how to convert it, per-layer overrides.

The model and convert sections of a recipe, and the one way the CLI and the keyword-argument API
validate them (``build_section``): every bad value is one line naming the setting and what it allows.
Bounds on a model's shape live here too, shared by the recipe schema and saved-model metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, cast, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from dgc_convert.errors import ConversionError, DGCConvertError, SettingsError, shown
from dgc_convert.nn.settings import (
    DEFAULT_GATING,
    DEFAULT_HEADS,
    DEFAULT_SQUEEZE_RATIO,
    DEFAULT_SQUEEZE_RULE,
    DEFAULT_ZETA,
    GATINGS,
    SQUEEZE_RULES,
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

# The bounds of a DGC layer's settings, shared by the convert section and its per-layer overrides.
Heads = Annotated[Count, Field(ge=1)]
Zeta = Annotated[float, Field(ge=0.0, lt=1.0)]
SqueezeRatio = Annotated[float, Field(ge=1.0)]
# The layer's choices, as the schema's types (the layer's constants name them; checked at import below).
Gating = Literal["head", "network"]
SqueezeRule = Literal["standard", "authors"]
if get_args(Gating) != GATINGS or get_args(SqueezeRule) != SQUEEZE_RULES:  # not an assert: kept under -O
    raise RuntimeError("the recipe schema's gating/squeeze_rule choices disagree with DGCConv2d's")


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
        description="start from these trained dense weights: a file (dense_weights.WEIGHTS_SUFFIXES) or a run's "
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


class OverrideSection(Section):
    """Per-layer settings for the convolutions a glob pattern matches.

    Every key is tri-state: None leaves the value an earlier pattern (or the
    section) set, so ``{"layer4.*": {skip: true}, "layer4.0.conv1": {zeta:
    0.7}}`` keeps ``layer4.0.conv1`` skipped; ``skip: false`` un-skips.
    """

    heads: Heads | None = None
    zeta: Zeta | None = None
    squeeze_ratio: SqueezeRatio | None = None
    skip: bool | None = None
    preact: bool | None = None
    squeeze_rule: SqueezeRule | None = None

    @model_validator(mode="before")
    @classmethod
    def _gating_is_model_wide(cls, value: Any) -> Any:
        # One threshold for the whole model: a layer cannot gate differently.
        if isinstance(value, Mapping) and "gating" in value:
            raise ValueError("gating is model-wide (one threshold for the whole model); set convert.gating instead")
        return value


class ConvertSection(Section):
    """How to convert: the one settings object of a conversion (CLI, recipes and the API build it).

    ``enabled: false`` trains the dense model the same way (``surgery.convert``
    itself ignores the flag). The layer defaults (heads, squeeze ratio, zeta,
    gating, squeeze rule) are ``DGCConv2d``'s own, so a layer built by hand and
    one converted here agree. ``gating`` is model-wide (DGC-G's threshold is
    one value for the whole model): overrides may set ``preact`` and
    ``squeeze_rule`` per layer, never ``gating``.
    """

    enabled: bool = True
    heads: Heads = Field(default=DEFAULT_HEADS, description="heads per converted layer")
    squeeze_ratio: SqueezeRatio = Field(default=DEFAULT_SQUEEZE_RATIO, description="saliency generator squeeze ratio d")
    zeta: Zeta = Field(default=DEFAULT_ZETA, description="pruning ratio: fraction of input channels each head drops")
    gating: Gating = Field(
        default=cast(Gating, DEFAULT_GATING),
        description="head: each head keeps its top k; network (DGC-G): channels above one model-wide threshold",
    )
    preact: bool = Field(
        default=False, description="give each DGC layer its own BatchNorm + ReLU in front (the authors' networks)"
    )
    squeeze_rule: SqueezeRule = Field(
        default=cast(SqueezeRule, DEFAULT_SQUEEZE_RULE),
        description="saliency generator width and init: standard max(C//d, 4), or the authors' code's rule",
    )
    include: list[str] = Field(default_factory=list, description="glob over module names; only matching convs convert")
    exclude: list[str] = Field(default_factory=list, description="glob over module names to leave dense")
    min_channels: Count = Field(default=16, ge=1, description="fewest input channels worth gating")
    overrides: dict[str, OverrideSection] = Field(default_factory=dict)


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
    lower = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    upper = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(annotation)
    shown_kind = f"{kind} " if kind and with_kind else ""
    if annotation is int and bounds == {"ge": 1}:
        return "a positive integer"
    if lower and upper:
        return f"in {lower[0]}{_number(lower[1])}, {_number(upper[1])}{upper[0]}"
    if lower or upper:
        sign = {"[": ">=", "(": ">", "]": "<=", ")": "<"}[(lower or upper)[0]]  # type: ignore[index]
        return f"{shown_kind}{sign} {_number((lower or upper)[1])}"  # type: ignore[index]
    return kind or f"of type {getattr(annotation, '__name__', annotation)}"


def _number(bound: Any) -> str:
    """A bound as written: 1000000, not 1e+06; 0.5, not 0.500000."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


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
