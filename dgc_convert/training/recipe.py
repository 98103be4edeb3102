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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from dgc_convert.conversion.settings import (
    MAX_INPUT_CHANNELS,
    MAX_INPUT_SIDE,
    MAX_NUM_CLASSES,
    ConvertSection,
    Count,
    LayerOverride,
    ModelSection,
    OverrideSection,
    Section,
    build_section,
    convert_settings,
    model_settings,
)
from dgc_convert.errors import RecipeError, shown
from dgc_convert.training.schedule import DEFAULT_FINETUNE_FRACTION, DEFAULT_WARMUP_FRACTION

# The sections a recipe shares with the conversion API are defined in conversion.settings;
# their names stay importable here, where a recipe's reader looks for them.
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
    "MAX_RECIPE_BYTES",
    "MAX_NUM_CLASSES",
    "MAX_INPUT_CHANNELS",
    "MAX_INPUT_SIDE",
]

# A recipe is a short hand-written file: anything longer is refused before it is parsed.
MAX_RECIPE_BYTES = 1 << 20  # 1 MiB


class TrainSection(Section):
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


class DataSection(Section):
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


class OutputSection(Section):
    """Where checkpoints and metrics go."""

    directory: str = "runs/default"


class Recipe(Section):
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
