"""Save and load converted models: one safetensors file (weights plus the metadata to rebuild the
model by name), never a pickle; ``load`` opens the trainer's checkpoints too.

What the metadata records per layer, and how files written before a key existed (layout, gating,
pre-activation, squeeze rule) load: ``docs/files.md``, "Saved models".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast, get_args

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from dgc_convert._version import __version__
from dgc_convert.conversion.settings import (
    MAX_INPUT_CHANNELS,
    MAX_INPUT_SIDE,
    MAX_NUM_CLASSES,
)
from dgc_convert.conversion.surgery import LayerSettings, apply_conversion, dgc_layers
from dgc_convert.conversion.zoo import Library, ModelInfo, attach_model_info, create_model, model_info
from dgc_convert.errors import DGCConvertError, LoadError, UnknownModelError, first_line, shown
from dgc_convert.files.atomic import atomic_write
from dgc_convert.files.model_file import MODEL_FORMAT, weights_file
from dgc_convert.nn.layer import DGCConv2d

__all__ = [
    "MODEL_FORMAT",
    "LoadError",
    "model_metadata",
    "save",
    "load",
    "read_metadata",
    "saved_layouts",
    "saved_layer_settings",
    "apply_saved_layouts",
]

_FORMAT_NAME, _FORMAT_VERSION = MODEL_FORMAT.rsplit("/", 1)
# A conversion entry's "layout"; entries written before the key existed are interleaved.
_LAYOUTS = {"blocked": False, "interleaved": True}  # name -> DGCConv2d.interleaved
_LAYOUT_NAMES = {interleaved: name for name, interleaved in _LAYOUTS.items()}
_LAYOUT_BEFORE_THE_KEY = "interleaved"
_LIBRARIES: tuple[str, ...] = get_args(Library)  # the zoo's libraries


def _layer_entry(name: str, layer: DGCConv2d) -> dict[str, Any]:
    """One layer's saved entry: its name, every ``LayerSettings`` field (the layout written as
    "layout", the form every release reads) and its current ``zeta_t``."""
    settings = layer.settings.to_dict()
    interleaved = settings.pop("interleaved")
    return {"name": name, **settings, "zeta_t": layer.zeta_t_value, "layout": _LAYOUT_NAMES[interleaved]}


def model_metadata(model: nn.Module, input_size: int | tuple[int, ...] | None = None) -> dict[str, str]:
    """The safetensors metadata (str -> str) that lets ``load`` rebuild ``model``.

    ``model`` must come from ``dgc_convert.create_model`` (which records the
    name and library to rebuild it from).
    """
    info = model_info(model)
    if info is None:
        raise DGCConvertError(
            "save needs a model built by dgc_convert.create_model: it records the name and library to rebuild it from"
        )
    layers = [_layer_entry(name, layer) for name, layer in dgc_layers(model)]
    given = input_size if input_size is not None else info.input_size
    size = [int(v) for v in ((3, given, given) if isinstance(given, int) else given)]
    return {
        "format": MODEL_FORMAT,
        "model": info.name,
        "library": info.library,
        "num_classes": json.dumps(info.num_classes),
        "input_size": json.dumps(size),
        "conversion": json.dumps(layers),
        "dgc_convert_version": __version__,
        "torch_version": torch.__version__,
    }


def save(model: nn.Module, path: str | Path, *, input_size: int | tuple[int, ...] | None = None) -> Path:
    """Write ``model`` to one ``.safetensors`` file (weights + rebuild metadata); returns the path."""
    path = Path(path)
    if getattr(model, "dgc_prepared_for_inference", False):
        raise DGCConvertError(
            "save the model before prepare_for_inference: folded BatchNorms cannot be rebuilt by name"
        )
    metadata = model_metadata(model, input_size)
    # safetensors writes its files 0600; atomic_write gives the usual 0666 less the umask.
    with atomic_write(path) as temporary:
        save_model(model, str(temporary), metadata=metadata)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a model file (or checkpoint directory), checked to be ours and not newer than this version."""
    file = weights_file(Path(path))
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LoadError(f"{file}: not a readable safetensors file ({detail})") from None
    fmt = metadata.get("format", "")
    if not fmt.startswith(_FORMAT_NAME + "/") or "conversion" not in metadata:
        raise LoadError(
            f"{file}: no dgc-convert model metadata (format {fmt or 'missing'!r}); it cannot be rebuilt by name"
        )
    version = fmt.rsplit("/", 1)[1]
    if not version.isdigit() or int(version) > int(_FORMAT_VERSION):
        raise LoadError(
            f"{file}: written in format {shown(fmt)}, newer than this dgc-convert ({__version__}) reads ({MODEL_FORMAT}); upgrade dgc-convert"
        )
    _check_metadata(metadata, file)
    return metadata


def _field(metadata: dict[str, str], key: str, file: Path) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError, RecursionError):  # ValueError: JSONDecodeError, or an int of too many digits
        raise LoadError(f"{file}: metadata field {key!r} is missing or not valid JSON") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metadata(metadata: dict[str, str], file: Path) -> None:
    """Every field ``load`` builds from, checked for type and range before anything is built
    (``conversion.settings.MAX_*`` bound the shape): ``LoadError`` naming the file, the field and the value."""

    def bad(key: str, value: Any, expected: str) -> LoadError:
        return LoadError(f"{file}: metadata field {key!r} must be {expected}, got {shown(value)}")

    name = metadata.get("model")
    if not isinstance(name, str) or not name:
        raise bad("model", name, "a model name")
    library = metadata.get("library")
    if library not in _LIBRARIES:
        raise bad("library", library, " or ".join(_LIBRARIES))
    num_classes = _field(metadata, "num_classes", file)
    if not _is_int(num_classes) or not 1 <= num_classes <= MAX_NUM_CLASSES:
        raise bad("num_classes", num_classes, f"an integer in [1, {MAX_NUM_CLASSES}]")
    size = _field(metadata, "input_size", file)
    if (
        not isinstance(size, list)
        or len(size) != 3
        or not all(_is_int(v) for v in size)
        or not 1 <= size[0] <= MAX_INPUT_CHANNELS
        or not all(1 <= v <= MAX_INPUT_SIDE for v in size[1:])
    ):
        raise bad(
            "input_size",
            size,
            f"[channels, height, width]: channels in [1, {MAX_INPUT_CHANNELS}], sides in [1, {MAX_INPUT_SIDE}]",
        )
    layers = _field(metadata, "conversion", file)
    if not isinstance(layers, list):
        raise bad("conversion", layers, "a list of layers")
    names: set[str] = set()
    for entry in layers:
        try:
            _layer_settings(entry)
        except (KeyError, TypeError, AttributeError) as error:
            detail = shown(str(error), quoted=False)
            raise LoadError(f"{file}: metadata field 'conversion' is malformed ({detail})") from None
        except ValueError as error:
            raise LoadError(f"{file}: metadata field 'conversion': {error}") from None
        if entry["name"] in names:
            raise LoadError(f"{file}: metadata field 'conversion': layer {shown(entry['name'])} appears twice")
        names.add(entry["name"])


def _interleaved(entry: Any) -> bool:
    """Whether a saved conversion entry is an interleaved layer (no "layout": written before it existed)."""
    layout = entry.get("layout", _LAYOUT_BEFORE_THE_KEY)
    if not isinstance(layout, str) or layout not in _LAYOUTS:
        raise ValueError(
            f"layer {shown(entry.get('name'))}: unknown layout {shown(layout)} (expected blocked or interleaved)"
        )
    return _LAYOUTS[layout]


# Keys every saved layer has had since the format's first files; the rest default to what
# every layer was before they were written.
_REQUIRED_LAYER_KEYS = ("heads", "squeeze_ratio", "zeta")


def _layer_settings(entry: Any) -> LayerSettings:
    """The ``LayerSettings`` a saved conversion entry records, checked by ``LayerSettings`` itself
    (types, bounds, choices); a bad entry raises ``ValueError`` naming the layer."""
    if not isinstance(entry, dict):
        raise ValueError(f"each layer must be a mapping, got {shown(entry)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"each layer needs a module name, got {shown(name)}")
    zeta_t = entry.get("zeta_t", 0.0)
    if not (isinstance(zeta_t, (int, float)) and not isinstance(zeta_t, bool) and 0.0 <= zeta_t < 1.0):
        raise ValueError(f"layer {shown(name)}: zeta_t must be in [0, 1), got {shown(zeta_t)}")
    missing = [key for key in _REQUIRED_LAYER_KEYS if key not in entry]
    if missing:
        raise ValueError(f"layer {shown(name)}: {missing[0]} is missing")
    try:
        return LayerSettings.from_dict({**entry, "interleaved": _interleaved(entry)})
    except ValueError as error:
        raise ValueError(f"layer {shown(name)}: {error}") from None


def saved_layer_settings(metadata: dict[str, str]) -> dict[str, LayerSettings]:
    """Module name -> ``LayerSettings`` for every DGC layer a file's metadata records
    (``read_metadata``): what ``apply_conversion`` rebuilds the layers with."""
    try:
        return {str(entry["name"]): _layer_settings(entry) for entry in json.loads(metadata["conversion"])}
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, RecursionError) as error:
        detail = shown(str(error), quoted=False)
        raise LoadError(f"metadata field 'conversion' is missing or malformed ({detail})") from None
    except ValueError as error:  # an int of too many digits too
        raise LoadError(f"metadata field 'conversion': {shown(str(error), 300, quoted=False)}") from None


def saved_layouts(metadata: dict[str, str]) -> dict[str, bool]:
    """Module name -> ``interleaved`` for every DGC layer a file's metadata records
    (``read_metadata``); entries without a "layout" are interleaved."""
    return {name: settings.interleaved for name, settings in saved_layer_settings(metadata).items()}


def apply_saved_layouts(model: nn.Module, metadata: dict[str, str]) -> None:
    """Give every DGC layer of ``model`` the layout its saved entry records, in place.

    For loading a file's weights into a model built some other way (a trainer
    resuming from a checkpoint rebuilds it from the recipe): a file written
    before blocked ownership holds interleaved layers, and its weights mean
    what they meant only in that layout. Raises ``LoadError`` when the saved
    layers are not the model's DGC layers, or differ from them in gating,
    pre-activation or squeeze rule (which fix the layers' tensors and what
    they compute, so the model must be built with the saved ones).
    """
    saved = saved_layer_settings(metadata)
    layers = dict(dgc_layers(model))
    if set(saved) != set(layers):
        differ = sorted(set(saved) ^ set(layers))
        raise LoadError(f"the saved DGC layers are not the model's: {differ[0]} ({len(differ)} names differ)")
    for name, layer in layers.items():
        for key in ("gating", "preact", "squeeze_rule"):
            if getattr(saved[name], key) != getattr(layer, key):
                raise LoadError(
                    f"layer {name}: saved with {key} {getattr(saved[name], key)!r}, the model's is "
                    f"{getattr(layer, key)!r}; build it with the saved settings"
                )
    for name, layer in layers.items():
        layer.interleaved = saved[name].interleaved


def load(path: str | Path) -> nn.Module:
    """Rebuild and load a model saved by ``save`` or by the trainer, in eval mode.

    Raises:
        LoadError: not a file, not safetensors, truncated, missing or newer
            metadata, a model this environment cannot build, or tensors that
            do not match. Nothing is ever unpickled.
    """
    file = weights_file(Path(path))
    metadata = read_metadata(file)
    layers = _field(metadata, "conversion", file)
    num_classes = _field(metadata, "num_classes", file)
    name, library = metadata["model"], metadata["library"]  # checked by read_metadata
    try:
        model = create_model(name, source=library, num_classes=num_classes)
    except UnknownModelError as error:
        raise LoadError(f"{file}: cannot rebuild {library} model {shown(name)} here ({first_line(error)})") from None
    if layers:
        try:
            # The saved per-layer settings, applied by name: today's eligibility
            # rules are not consulted, so a later rule never makes this file unloadable.
            apply_conversion(model, {layer["name"]: _layer_settings(layer) for layer in layers})
        except (DGCConvertError, AttributeError, KeyError, TypeError, ValueError) as error:
            raise LoadError(f"{file}: the saved conversion does not apply to {name}: {error}") from None
    try:
        missing_keys, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, RuntimeError) as error:
        detail = str(error).strip().splitlines()[0] if str(error) else type(error).__name__
        raise LoadError(f"{file}: tensors do not match the rebuilt {name}: {detail[:300]}") from None
    if missing_keys or unexpected:
        what = f"missing {missing_keys[0]}" if missing_keys else f"unexpected {unexpected[0]}"
        count = len(missing_keys) + len(unexpected)
        raise LoadError(f"{file}: tensors do not match the rebuilt {name}: {what} ({count} keys differ)")
    size = _field(metadata, "input_size", file)
    attach_model_info(model, ModelInfo(name, cast(Library, library), tuple(size), num_classes, False))
    return model.eval()
