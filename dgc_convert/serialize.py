"""Save and load converted models: one safetensors file, never a pickle.

``save(model, path)`` writes the weights (``zeta_t`` buffers included) and,
in the file's metadata, everything needed to rebuild the model: its name and
library, class count, input size, the conversion of every DGC layer (heads,
squeeze ratio, zeta, zeta_t, layout, gating, preact, squeeze rule), and the
dgc-convert and torch versions.
``load(path)`` rebuilds the model from timm or torchvision by name,
applies the saved per-layer conversion to the named modules, loads the weights and checks that every tensor
matched. The trainer's ``last``/``best`` checkpoints carry the same metadata,
so ``load`` opens them too (a checkpoint directory or its ``model.safetensors``).

Layout: every layer records ``"layout": "blocked"`` (head i owns a contiguous
block of output channels) or ``"interleaved"`` (head i owns channels i::H).
Files written before the key existed were all interleaved, so an entry without
it loads as an interleaved layer and computes exactly what it did.

Gating, pre-activation and squeeze rule: every layer records ``"gating"``
("head" or "network"), ``"preact"`` (true or false) and ``"squeeze_rule"``
("standard" or "authors"); entries written before these keys existed load as
head / false / standard, what every layer was then. A network-gated layer's
threshold and a preact layer's ``norm`` are tensors of the weights file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from dgc_convert import __version__
from dgc_convert.checkpoint import MODEL_FILE
from dgc_convert.errors import DGCConvertError, LoadError, UnknownModelError
from dgc_convert.nn.layer import DEFAULT_GATING, DEFAULT_SQUEEZE_RULE, GATINGS, SQUEEZE_RULES
from dgc_convert.surgery import LayerSettings, apply_conversion, dgc_layers
from dgc_convert.zoo import Library, ModelInfo, attach_model_info, create_model, model_info

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

MODEL_FORMAT = "dgc-convert-model/1"
_FORMAT_NAME, _FORMAT_VERSION = MODEL_FORMAT.rsplit("/", 1)
# A conversion entry's "layout"; entries written before the key existed are interleaved.
_LAYOUTS = {"blocked": False, "interleaved": True}  # name -> DGCConv2d.interleaved
_LAYOUT_BEFORE_THE_KEY = "interleaved"


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
    layers = [
        {
            "name": name,
            "heads": layer.heads,
            "squeeze_ratio": layer.squeeze_ratio,
            "zeta": layer.zeta,
            "zeta_t": layer.zeta_t_value,
            "layout": "interleaved" if layer.interleaved else "blocked",
            "gating": layer.gating,
            "preact": layer.preact,
            "squeeze_rule": layer.squeeze_rule,
        }
        for name, layer in dgc_layers(model)
    ]
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
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_model(model, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path


def weights_file(path: Path, error: type[LoadError] = LoadError) -> Path:
    """The file ``path`` names: itself, or a checkpoint directory's ``model.safetensors``;
    ``error`` (one line naming the path) when there is none."""
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.is_file():
            hint = " (a run's checkpoints are its last/ and best/ directories)" if (path / "last").is_dir() else ""
            raise error(f"{path}: a directory without {MODEL_FILE}{hint}")
        return candidate
    if not path.exists():
        raise error(f"{path}: no such file")
    if not path.is_file():
        raise error(f"{path}: not a file")
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
            f"{file}: written in format {fmt}, newer than this dgc-convert ({__version__}) reads ({MODEL_FORMAT}); upgrade dgc-convert"
        )
    return metadata


def _field(metadata: dict[str, str], key: str, file: Path) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError):
        raise LoadError(f"{file}: metadata field {key!r} is missing or not valid JSON") from None


def _interleaved(entry: Any) -> bool:
    """Whether a saved conversion entry is an interleaved layer (no "layout": written before it existed)."""
    layout = entry.get("layout", _LAYOUT_BEFORE_THE_KEY)
    if layout not in _LAYOUTS:
        raise ValueError(f"layer {entry.get('name')!r}: unknown layout {layout!r} (expected blocked or interleaved)")
    return _LAYOUTS[layout]


def _layer_settings(entry: Any) -> LayerSettings:
    """The ``LayerSettings`` a saved conversion entry records; keys added after the
    format's first files default to what every layer was before them."""
    name = entry.get("name")
    gating = entry.get("gating", DEFAULT_GATING)
    if gating not in GATINGS:
        raise ValueError(f"layer {name!r}: unknown gating {gating!r} (expected {' or '.join(GATINGS)})")
    preact = entry.get("preact", False)
    if not isinstance(preact, bool):
        raise ValueError(f"layer {name!r}: preact must be true or false, got {preact!r}")
    rule = entry.get("squeeze_rule", DEFAULT_SQUEEZE_RULE)
    if rule not in SQUEEZE_RULES:
        raise ValueError(f"layer {name!r}: unknown squeeze_rule {rule!r} (expected {' or '.join(SQUEEZE_RULES)})")
    return LayerSettings(
        int(entry["heads"]),
        float(entry["squeeze_ratio"]),
        float(entry["zeta"]),
        interleaved=_interleaved(entry),
        gating=gating,
        preact=preact,
        squeeze_rule=rule,
    )


def saved_layer_settings(metadata: dict[str, str]) -> dict[str, LayerSettings]:
    """Module name -> ``LayerSettings`` for every DGC layer a file's metadata records
    (``read_metadata``): what ``apply_conversion`` rebuilds the layers with."""
    try:
        return {str(entry["name"]): _layer_settings(entry) for entry in json.loads(metadata["conversion"])}
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise LoadError(f"metadata field 'conversion' is missing or malformed ({error})") from None
    except ValueError as error:
        raise LoadError(f"metadata field 'conversion': {error}") from None


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
    name, library = metadata.get("model", ""), metadata.get("library", "auto")
    if library not in ("timm", "torchvision"):
        raise LoadError(f"{file}: metadata names library {library!r}; expected timm or torchvision")
    try:
        model = create_model(name, source=library, num_classes=num_classes)
    except UnknownModelError as error:
        raise LoadError(f"{file}: cannot rebuild {library} model {name!r} here ({error})") from None
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
