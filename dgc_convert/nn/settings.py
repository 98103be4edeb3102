"""One DGC layer's settings: the one type every per-layer setting is declared in (no torch).

``LayerSettings`` is what a layer is built from (``DGCConv2d.from_conv(conv, settings)``), what
the surgery decides per convolution, what a saved model records per layer, and what a recipe's
per-layer override sets (its all-optional form, built from these fields in
``conversion.settings``). Each field carries its default, its bound or choices and its help text,
so adding an option means adding a field here and the layer code that uses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import Field, asdict, dataclass, field, fields, replace
from typing import Any

__all__ = [
    "LayerSettings",
    "Bound",
    "setting_type",
    "setting_bound",
    "setting_choices",
    "setting_help",
    "user_settings",
    "SettingsFields",
    "MODEL_WIDE_SETTINGS",
    "DEFAULT_HEADS",
    "DEFAULT_SQUEEZE_RATIO",
    "DEFAULT_ZETA",
    "DEFAULT_GATING",
    "DEFAULT_SQUEEZE_RULE",
    "GATINGS",
    "SQUEEZE_RULES",
]

# The layer's defaults, which the recipe schema (``ConvertSection``) uses too:
# a layer built by hand and one converted with default settings agree.
DEFAULT_HEADS = 4
DEFAULT_SQUEEZE_RATIO = 16
DEFAULT_ZETA = 0.5

# How a layer decides which channels a head keeps: "head", each head its top
# k (the paper's head-wise DGC); "network", every channel whose score is above
# one threshold shared by the whole model (DGC-G, see ``threshold``).
GATINGS: tuple[str, ...] = ("head", "network")
DEFAULT_GATING = "head"
# The saliency generator's hidden width and initialisation ("squeeze rule"):
# "standard", ``max(C // d, 4)`` hidden units and nn.Linear's uniform init;
# "authors", the released code's rule: d halved below 80 input channels,
# ``C // d`` units, kaiming-normal FC weights. Both start the bias beta at 1.
SQUEEZE_RULES: tuple[str, ...] = ("standard", "authors")
DEFAULT_SQUEEZE_RULE = "standard"


@dataclass(frozen=True)
class Bound:
    """A number's allowed range: ``ge``/``gt`` below, ``le``/``lt`` above (None: open); ``integer``
    for a whole number (never a boolean)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    integer: bool = False

    def admits(self, value: float) -> bool:
        """Whether ``value`` lies inside the range."""
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self, *, with_kind: bool = True) -> str:
        """The range as an error message says it: 'a positive integer', 'in [0, 1)', 'a number >= 1'
        ('>= 1' without ``with_kind``: for a value of the right kind that is out of range)."""
        if self.integer and self.ge == 1 and self.gt is None and self.le is None and self.lt is None:
            return "a positive integer"
        low = f"[{_number(self.ge)}" if self.ge is not None else f"({_number(self.gt)}" if self.gt is not None else None
        high = (
            f"{_number(self.le)}]" if self.le is not None else f"{_number(self.lt)})" if self.lt is not None else None
        )
        kind = "an integer" if self.integer else "a number"
        if low and high:
            return f"in {low}, {high}"
        prefix = f"{kind} " if with_kind else ""
        if low:
            return f"{prefix}{'>=' if low[0] == '[' else '>'} {low[1:]}"
        if high:
            return f"{prefix}{'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        return kind


def _number(value: float | None) -> str:
    """A bound as written: 1000000, not 1e+06; 0.5, not 0.500000."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _setting(
    help: str,
    *,
    bound: Bound | None = None,
    choices: tuple[str, ...] | None = None,
    model_wide: str | None = None,
    internal: bool = False,
) -> dict[str, Any]:
    """A field's metadata: its help text, bound or choices; ``model_wide``: why one value covers the
    whole model (never set per layer); ``internal``: recorded with a layer, never set by a user."""
    return {"help": help, "bound": bound, "choices": choices, "model_wide": model_wide, "internal": internal}


@dataclass(frozen=True)
class LayerSettings:
    """The DGC settings of one layer, checked when built (``ValueError`` naming the setting).

    ``heads``: groups of output channels, each with its own saliency generator; ``squeeze_ratio``:
    the generator's squeeze ratio d; ``zeta``: the pruning ratio, the fraction of input channels
    each head drops; ``interleaved``: the head-ownership layout of models saved before blocked
    ownership and of the authors' checkpoints (every new conversion is blocked); ``gating``,
    ``preact`` and ``squeeze_rule``: as ``DGCConv2d`` takes them.
    """

    heads: int = field(
        default=DEFAULT_HEADS, metadata=_setting("heads per converted layer", bound=Bound(ge=1, integer=True))
    )
    squeeze_ratio: float = field(
        default=DEFAULT_SQUEEZE_RATIO, metadata=_setting("saliency generator squeeze ratio d", bound=Bound(ge=1.0))
    )
    zeta: float = field(
        default=DEFAULT_ZETA,
        metadata=_setting("pruning ratio: fraction of input channels each head drops", bound=Bound(ge=0.0, lt=1.0)),
    )
    interleaved: bool = field(
        default=False,
        metadata=_setting("the older interleaved head layout (files before blocked ownership)", internal=True),
    )
    gating: str = field(
        default=DEFAULT_GATING,
        metadata=_setting(
            "head: each head keeps its top k; network (DGC-G): channels above one model-wide threshold",
            choices=GATINGS,
            model_wide="one threshold for the whole model",
        ),
    )
    preact: bool = field(
        default=False,
        metadata=_setting("give each DGC layer its own BatchNorm + ReLU in front (the authors' networks)"),
    )
    squeeze_rule: str = field(
        default=DEFAULT_SQUEEZE_RULE,
        metadata=_setting(
            "saliency generator width and init: standard max(C//d, 4), or the authors' code's rule",
            choices=SQUEEZE_RULES,
        ),
    )

    def __post_init__(self) -> None:
        for item in fields(self):
            _check(item.name, getattr(self, item.name), item.type, item.metadata)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LayerSettings:
        """Settings from plain data (a saved file's entry): missing keys take their defaults,
        unknown keys are ignored, and every value is checked for its type (``ValueError``)."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @classmethod
    def with_options(cls, settings: LayerSettings | None, options: Mapping[str, Any]) -> LayerSettings:
        """``settings`` (the defaults when None) with ``options`` (field name -> value) on top:
        how a layer takes both a settings object and keywords. ``TypeError`` for a name that is
        no field, as for an unexpected keyword argument."""
        known = [item.name for item in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r} (the DGC settings are {', '.join(known)})")
        return replace(settings if settings is not None else cls(), **options)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, field by field."""
        return asdict(self)


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_QUOTED = 80  # characters of a bad value an error message quotes


def _quoted(value: Any) -> str:
    """``repr(value)`` cut to a readable length (a value read from a file may be any size)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit
        return "an integer of too many digits"
    return text if len(text) <= _QUOTED else f"{text[:_QUOTED]}... ({len(text)} characters)"


def _check(name: str, value: Any, annotation: object, metadata: Mapping[str, Any]) -> None:
    """``ValueError`` unless ``value`` has the field's type and lies in its bound or choices."""
    kind = _TYPES[str(annotation)]  # the annotations are strings here (postponed evaluation)
    bound: Bound | None = metadata.get("bound")
    choices: tuple[str, ...] | None = metadata.get("choices")
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {_quoted(value)}")
        return
    if kind is str:
        if not isinstance(value, str) or (choices is not None and value not in choices):
            expected = " or ".join(choices) if choices else "text"
            raise ValueError(f"unknown {name} {_quoted(value)} (expected {expected})")
        return
    number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        number_ok = number_ok and isinstance(value, int)
    if not number_ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a finite number'}, got {_quoted(value)}")
    if bound is not None and not bound.admits(value):
        raise ValueError(f"{name} must be {bound.describe(with_kind=False)}, got {_quoted(value)}")


def _field(name: str) -> Field[Any]:
    for item in fields(LayerSettings):
        if item.name == name:
            return item
    raise KeyError(name)


def _field_metadata(name: str) -> Mapping[str, Any]:
    return _field(name).metadata


def setting_type(name: str) -> type:
    """A setting's Python type: int, float, bool or str."""
    return _TYPES[str(_field(name).type)]


def setting_bound(name: str) -> Bound | None:
    """The bound of a numeric setting (None for a choice or a flag)."""
    bound: Bound | None = _field_metadata(name)["bound"]
    return bound


def setting_choices(name: str) -> tuple[str, ...] | None:
    """The allowed values of a choice setting (None for a number or a flag)."""
    choices: tuple[str, ...] | None = _field_metadata(name)["choices"]
    return choices


def setting_help(name: str) -> str:
    """A setting's one-line help text (recipe schema descriptions, CLI help)."""
    text: str = _field_metadata(name)["help"]
    return text


# Settings one value covers for the whole model (name -> why): a recipe sets them once, never per layer.
MODEL_WIDE_SETTINGS: dict[str, str] = {
    item.name: item.metadata["model_wide"] for item in fields(LayerSettings) if item.metadata["model_wide"]
}


# The settings a user chooses (every field but internal ones), in declaration order.
_USER_SETTINGS: tuple[str, ...] = tuple(item.name for item in fields(LayerSettings) if not item.metadata["internal"])


def user_settings() -> tuple[str, ...]:
    """The settings a user chooses (every field but internal ones), in declaration order."""
    return _USER_SETTINGS


class SettingsFields:
    """Mixin for a record that holds ``settings: LayerSettings | None`` (a decision, a summary row):
    every user setting reads as the record's own attribute (``row.heads``), None without settings,
    so a new setting shows up in every such record without being copied into it."""

    settings: LayerSettings | None

    def __getattr__(self, name: str) -> Any:
        # Called only when normal lookup fails: never for the record's own fields.
        if name in _USER_SETTINGS:
            settings = self.__dict__.get("settings")
            return None if settings is None else getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def settings_dict(self) -> dict[str, Any]:
        """Every user setting by name (None each without settings): the record's JSON form of them."""
        return {name: getattr(self, name) for name in _USER_SETTINGS}
