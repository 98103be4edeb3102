"""Recipe files: a validated schema, safe YAML loading and ``--set`` overrides.

A recipe describes one repeatable run: which model, how to convert it, how
to train it, on which data, and where to write. Unknown keys are errors, and
every error names the file, the key path, the bad value and what is allowed,
in one line. Loading is bounded: at most ``MAX_RECIPE_BYTES`` of UTF-8, no YAML
aliases or anchors (no alias bomb), no key written twice, and every quoted value
cut to a short prefix (``shown``).
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, cast, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from dgc_convert.errors import ConversionError, DGCConvertError, RecipeError, SettingsError
from dgc_convert.nn.layer import (
    DEFAULT_GATING,
    DEFAULT_HEADS,
    DEFAULT_SQUEEZE_RATIO,
    DEFAULT_SQUEEZE_RULE,
    DEFAULT_ZETA,
    GATINGS,
    SQUEEZE_RULES,
)
from dgc_convert.schedule import DEFAULT_FINETUNE_FRACTION, DEFAULT_WARMUP_FRACTION

__all__ = [
    "Recipe",
    "ModelSection",
    "ConvertSection",
    "TrainSection",
    "DataSection",
    "OutputSection",
    "OverrideSection",
    "load_recipe",
    "recipe_from_dict",
    "apply_overrides",
    "LayerOverride",
    "build_section",
    "convert_settings",
    "model_settings",
    "shown",
    "MAX_RECIPE_BYTES",
    "MAX_NUM_CLASSES",
    "MAX_INPUT_CHANNELS",
    "MAX_INPUT_SIDE",
]

SectionT = TypeVar("SectionT", bound="_Section")

# Bounded inputs, in one place. A recipe is a short hand-written file; a model's
# shape is bounded before anything is built (the recipe schema's num_classes and
# saved-model metadata, serialize.read_metadata), so an absurd value is one line,
# not an allocation that takes the machine down.
MAX_RECIPE_BYTES = 1 << 20  # 1 MiB
MAX_NUM_CLASSES = 1_000_000
MAX_INPUT_CHANNELS = 64
MAX_INPUT_SIDE = 8192
# How much of a value an error message quotes.
SHOWN_CHARACTERS = 80


def shown(value: Any, limit: int = SHOWN_CHARACTERS, *, quoted: bool = True) -> str:
    """``repr(value)`` (``str`` without ``quoted``: a key path) for an error message, cut to ``limit``
    characters, an ellipsis and the full length after: how every recipe, settings and metadata error
    quotes a value, however long it is."""
    try:
        text = repr(value) if quoted else str(value)
    except ValueError:  # an int past Python's digit limit
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
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


class OverrideSection(_Section):
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


class ConvertSection(_Section):
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


class TrainSection(_Section):
    """The training run: the paper's three-stage schedule under a cosine learning rate."""

    epochs: Count = Field(default=1, ge=1)
    batch_size: Count = Field(default=64, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(default=1e-4, ge=0.0)
    warmup_fraction: float = Field(default=DEFAULT_WARMUP_FRACTION, ge=0.0, lt=1.0)
    finetune_fraction: float = Field(default=DEFAULT_FINETUNE_FRACTION, ge=0.0, le=1.0)
    zeta_ramp: Literal["linear", "cosine"] = "linear"
    sparsity_lambda: float = Field(default=1e-5, ge=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    seed: int = 0
    deterministic: bool = False
    num_workers: Count = Field(default=0, ge=0)
    checkpoint_every: Count = Field(default=1, ge=1, description="epochs between checkpoints")
    sync_batchnorm: bool = False
    tensorboard: bool = Field(
        default=False,
        description="also write TensorBoard scalars to OUTPUT/tensorboard/ (needs the tensorboard extra)",
    )

    @model_validator(mode="after")
    def _stages_fit(self) -> TrainSection:
        if self.warmup_fraction + self.finetune_fraction > 1.0:
            raise ValueError(
                f"warmup_fraction + finetune_fraction must be <= 1, got "
                f"{self.warmup_fraction:g} + {self.finetune_fraction:g}"
            )
        return self


class DataSection(_Section):
    """The data set: digits (scikit-learn, no download), synthetic, CIFAR or an image folder."""

    dataset: Literal["cifar10", "cifar100", "imagefolder", "digits", "synthetic"] = "digits"
    root: str | None = None
    download: bool = False
    image_size: Count | None = Field(default=None, ge=8)
    augmentation: Literal["none", "flip", "crop_flip", "standard"] = Field(
        default="standard",
        description="standard is the data set's usual one: crop+flip for CIFAR, random-resized crop+flip "
        "for image folders, a small random shift for digits (not mirror-symmetric), none for synthetic",
    )
    synthetic_size: Count = Field(default=256, ge=1, description="samples per split of the synthetic set")

    @model_validator(mode="after")
    def _root_where_needed(self) -> DataSection:
        if self.dataset in ("cifar10", "cifar100", "imagefolder") and not self.root:
            raise ValueError(f"dataset {self.dataset} needs data.root (a directory)")
        return self


class OutputSection(_Section):
    """Where checkpoints and metrics go."""

    directory: str = "runs/default"


class Recipe(_Section):
    """A whole recipe: model, convert, train, data, output."""

    model: ModelSection
    convert: ConvertSection = Field(default_factory=ConvertSection)
    train: TrainSection = Field(default_factory=TrainSection)
    data: DataSection = Field(default_factory=DataSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @field_validator("model", mode="before")
    @classmethod
    def _model_may_be_a_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


def _first_error(error: ValidationError, source: str) -> RecipeError:
    detail = error.errors()[0]
    keys = ".".join(str(p) for p in detail["loc"])
    path = shown(keys, quoted=False) or "(top level)"
    value = detail.get("input")
    kind = detail["type"]
    if kind == "extra_forbidden":
        message = f"unknown key {shown(keys)}"
        allowed = _allowed_keys(detail["loc"][:-1])
        if allowed:
            message += f"; allowed: {', '.join(allowed)}"
    elif kind == "missing":
        message = f"{path}: required key is missing"
    else:
        message = f"{path}={shown(value)}: {detail['msg'].removeprefix('Value error, ')}"
    return RecipeError(f"{source}: {message}")


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys the schema allows at ``loc`` (a path of section names)."""
    model: type[BaseModel] = Recipe
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if model is ConvertSection and part == "overrides":
            if not parts:
                return []
            parts.pop(0)  # the glob pattern
            model = OverrideSection
            continue
        field_info = model.model_fields.get(str(part))
        annotation = getattr(field_info, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


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


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Validate a mapping as a recipe; errors are ``RecipeError`` naming ``source``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise _first_error(error, source) from None


class _Refused(yaml.YAMLError):
    """YAML a recipe never needs (an alias or anchor, a key written twice), refused where it is written."""

    def __init__(self, problem: str, mark: Any, note: str = "") -> None:
        super().__init__(problem)
        self.problem, self.mark, self.note = problem, mark, note

    def where(self, of: str = "") -> str:
        line = f"line {self.mark.line + 1}, " if self.mark.line or not of else ""
        return f"{self.problem} ({line}column {self.mark.column + 1}{of}){self.note}"


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases and anchors (a recipe never needs them, and an alias bomb
    would expand a small file into an exponential graph) and without duplicate keys (where the
    second silently wins)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused("YAML aliases are not allowed", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused("YAML anchors are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: SafeConstructor says so below
                continue
            if duplicate:
                raise _Refused(f"duplicate key {shown(key)}", key_node.start_mark, "; each key may appear once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _safe_yaml(text: str) -> Any:
    """``text`` parsed by ``_RecipeLoader``: plain data only, no aliases, no duplicate keys."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    """A recipe file's text: one line naming the path when it is missing, a directory, a symlink
    loop, over ``MAX_RECIPE_BYTES`` or not UTF-8."""
    try:
        info = path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RecipeError(f"{path}: a symlink loop, not a recipe file") from None
        if isinstance(error, FileNotFoundError):
            broken = " (a symlink to a missing file)" if path.is_symlink() else ""
            raise RecipeError(f"{path}: no such recipe file{broken}") from None
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror or type(error).__name__})") from None
    if stat.S_ISDIR(info.st_mode):
        raise RecipeError(f"{path}: is a directory, not a recipe file")
    try:
        with path.open("rb") as handle:  # bounded even for a pipe or a device
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror or type(error).__name__})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: over {MAX_RECIPE_BYTES // (1 << 20)} MiB; a recipe is a short text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not a text file (not UTF-8 at byte {error.start})") from None


def _read_yaml(path: Path) -> Any:
    text = _read_text(path)
    try:
        return _safe_yaml(text)
    except _Refused as error:
        raise RecipeError(f"{path}: {error.where()}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{where}: {shown(problem, quoted=False)}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None


def _parse_assignment(assignment: str) -> tuple[list[str], Any]:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {shown(assignment)}: expected KEY.PATH=VALUE, e.g. train.epochs=3")
    try:
        value = _safe_yaml(raw) if raw.strip() else None
    except _Refused as error:
        raise RecipeError(f"--set {shown(assignment)}: {error.where(' of the value')}") from None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, assignments: list[str]) -> dict:
    """Apply ``KEY.PATH=VALUE`` assignments to recipe data (values parsed as YAML scalars)."""
    for assignment in assignments:
        path, value = _parse_assignment(assignment)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"--set {shown(assignment)}: {shown(part)} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe YAML file (a ``yaml.SafeLoader`` without aliases, anchors or duplicate
    keys, at most ``MAX_RECIPE_BYTES``), then apply ``--set`` overrides."""
    path = Path(path)
    data = _read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if isinstance(data.get("model"), str):
        data["model"] = {"name": data["model"]}
    apply_overrides(data, list(overrides or []))
    source = str(path) + (f" (with --set {shown(', '.join(overrides), quoted=False)})" if overrides else "")
    return recipe_from_dict(data, source)
