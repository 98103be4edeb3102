"""Start from trained weights: load a dense model's weights file, strictly, before conversion.

Which files are read and how (safetensors, or ``torch.load(weights_only=True)`` only), how a
training script's wrapper keys and prefixes are undone, and why a converted model is refused:
``docs/files.md``, "Starting from trained dense weights".
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from dgc_convert.conversion.zoo import model_info
from dgc_convert.errors import WeightsFileError, first_line
from dgc_convert.files.model_file import MODEL_FORMAT, weights_file

# The suffixes are file-name facts (files.names, no torch: the CLI's help names them); re-exported here.
from dgc_convert.files.names import SAFETENSORS_SUFFIX, TORCH_SUFFIXES, WEIGHTS_SUFFIXES

__all__ = [
    "SAFETENSORS_SUFFIX",
    "TORCH_SUFFIXES",
    "WEIGHTS_SUFFIXES",
    "WRAPPER_KEYS",
    "WRAPPER_PREFIXES",
    "WeightsSource",
    "find_weights_file",
    "read_torch_state_dict",
    "read_dense_weights",
    "load_dense_weights",
]

# Where training scripts keep the weights inside a saved dict, in the order they are taken.
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# Prefixes a wrapper adds to every key: DataParallel / DDP (module.) and torch.compile (_orig_mod.).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Names only a DGCConv2d holds (its saliency generator and zeta_t buffer): a converted model's file.
_DGC_NAMES = frozenset({"saliency_generator", "zeta_t"})
# What the metadata of a file dgc_convert.save or the trainer wrote starts its format with (any version).
_SAVED_FORMAT_PREFIX = MODEL_FORMAT.rsplit("/", 1)[0] + "/"
# Names an error lists before "..." and the count.
_SHOWN = 3


@dataclass(frozen=True)
class WeightsSource:
    """Where weights came from: the file read, the top-level key they sat under
    (None when the file is the state dict itself), the wrapper prefixes
    stripped from every key, and the number of tensors."""

    file: Path
    entry: str | None = None
    stripped: tuple[str, ...] = ()
    tensors: int = 0
    metadata: dict[str, str] = field(default_factory=dict, repr=False)  # a safetensors file's, else empty


def find_weights_file(path: str | Path) -> Path:
    """The file a weights path names, checked to exist, without reading it.

    ``path`` is a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file, or a
    training run's checkpoint directory (``RUN/last``, ``RUN/best``), which
    names its ``model.safetensors``. ``~`` is expanded; a relative path is
    relative to the current working directory.

    Raises:
        WeightsFileError: no such file, a directory without model.safetensors,
            or a suffix outside ``WEIGHTS_SUFFIXES``.
    """
    given = weights_file(Path(path).expanduser(), WeightsFileError)
    if given != Path(path).expanduser():  # a checkpoint directory's model.safetensors
        return given
    if given.suffix.lower() not in WEIGHTS_SUFFIXES:
        raise WeightsFileError(
            f"{given}: unknown weights file type {given.suffix or '(no suffix)'!r}; expected {', '.join(WEIGHTS_SUFFIXES)} "
            "or a training run's last/ or best/ directory"
        )
    return given


def _refusal(file: Path, error: pickle.UnpicklingError) -> WeightsFileError:
    """One line for a file ``torch.load(weights_only=True)`` would not read."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return WeightsFileError(
            f"{file}: holds a pickled object ({found.group(1)}) that weights-only loading refuses; "
            "only files of plain tensors and containers are read, nothing in them is executed"
        )
    # Anything else the weights-only unpickler stops at (an opcode it does not know: text, a foreign pickle).
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = detail.group(1).strip() if detail else first_line(error, 200)
    return WeightsFileError(f"{file}: not a readable PyTorch checkpoint ({reason[:200]})")


def _unwrap(loaded: Any, file: Path) -> tuple[dict[str, Tensor], str | None, tuple[str, ...]]:
    """(flat name -> tensor dict, the wrapper key it sat under, the prefixes stripped) of a loaded object."""
    state, entry = loaded, None
    if isinstance(loaded, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                state, entry = loaded[key], key
                break
    if not isinstance(state, Mapping) or not state:
        found = "an empty dict" if isinstance(state, Mapping) else f"a {type(state).__name__}"
        raise WeightsFileError(
            f"{file}: holds no dict of weights ({found}; expected a state_dict, or a dict with one of the keys "
            f"{', '.join(WRAPPER_KEYS)})"
        )
    where = f"its {entry!r} entry" if entry else "its state_dict"
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise WeightsFileError(f"{file}: entry {key!r} of {where} is a {type(value).__name__}, not a tensor")
        tensors[str(key)] = value
    stripped: list[str] = []
    # A wrapper prefixes every key; stripping only a prefix every key shares keeps names distinct.
    while prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in tensors)), None):
        tensors = {key[len(prefix) :]: value for key, value in tensors.items()}
        stripped.append(prefix)
    return tensors, entry, tuple(stripped)


def read_torch_state_dict(path: str | Path) -> tuple[dict[str, Tensor], WeightsSource]:
    """The weights of a ``torch.save`` file (any suffix) as a flat name -> tensor dict, and where they sat.

    Read with ``torch.load(map_location="cpu", weights_only=True)`` and
    nothing else; unwrapped as the module docstring says (``WRAPPER_KEYS``,
    ``WRAPPER_PREFIXES``).

    Raises:
        WeightsFileError: a missing or unreadable file, one that needs more
            than weights-only unpickling, or one without a dict of tensors.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsFileError(f"{file}: no such file" if not file.exists() else f"{file}: not a file")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refusal(file, error) from None
    except Exception as error:  # weights-only unpickling executes nothing; any failure means "not readable"
        raise WeightsFileError(f"{file}: not a readable PyTorch checkpoint ({first_line(error, 200)})") from None
    tensors, entry, stripped = _unwrap(loaded, file)
    return tensors, WeightsSource(file, entry, stripped, len(tensors))


def _read_safetensors(file: Path) -> tuple[dict[str, Tensor], WeightsSource]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            _refuse_saved_conversion(metadata, file)  # before reading a single tensor
            loaded = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a handle, not a dict)
    except WeightsFileError:
        raise
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsFileError(f"{file}: not a readable safetensors file ({first_line(error, 200)})") from None
    tensors, _, stripped = _unwrap(loaded, file)
    return tensors, WeightsSource(file, None, stripped, len(tensors), metadata)


def _refuse_saved_conversion(metadata: Mapping[str, str], file: Path) -> None:
    """Refuse a file ``dgc_convert.save`` (or the trainer) wrote for a model with DGC layers."""
    if not metadata.get("format", "").startswith(_SAVED_FORMAT_PREFIX):
        return
    try:
        layers = json.loads(metadata.get("conversion", "[]"))
    except json.JSONDecodeError:
        layers = None  # unreadable: the tensor names decide
    if layers:
        raise WeightsFileError(_converted_message(file, f"{len(layers)} DGC layers in its metadata"))


def _converted_message(file: Path, evidence: str) -> str:
    return (
        f"{file}: holds a converted DGC model ({evidence}), not dense weights; "
        "open it with dgc_convert.load or `dgc-convert eval`"
    )


def read_dense_weights(path: str | Path) -> tuple[dict[str, Tensor], WeightsSource]:
    """The dense weights ``path`` names (see ``find_weights_file``), as a flat name -> tensor dict.

    Returns the tensors as the file holds them (unwrapped, prefixes
    stripped) and a ``WeightsSource`` saying where they came from. Nothing
    beyond the file's own tensors is allocated.

    Raises:
        WeightsFileError: anything ``find_weights_file`` refuses, an unreadable
            file, a non-tensor entry, or a converted DGC model.
    """
    file = find_weights_file(path)
    if file.suffix.lower() == SAFETENSORS_SUFFIX:
        tensors, source = _read_safetensors(file)
    else:
        tensors, source = read_torch_state_dict(file)
    dgc_key = next((key for key in tensors if _DGC_NAMES.intersection(key.split("."))), None)
    if dgc_key is not None:
        raise WeightsFileError(_converted_message(file, f"e.g. {dgc_key}"))
    return tensors, source


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (", ..." if len(names) > _SHOWN else "")


def _shape(tensor: Tensor) -> str:
    return str(tuple(tensor.shape))


def _mismatch(name: str, given: Tensor, wanted: Tensor) -> str | None:
    """How a file's tensor differs from the model's, or None when it can be copied in.

    Floating-point tensors may differ in precision (copying casts, as
    ``load_state_dict`` does); anything else must have the model's dtype.
    """
    fits_dtype = (
        given.is_floating_point() and wanted.is_floating_point()
        if wanted.is_floating_point()
        else given.dtype == wanted.dtype
    )
    if given.shape == wanted.shape and fits_dtype:
        return None
    what_given, what_wanted = _shape(given), _shape(wanted)
    if not fits_dtype:
        what_given += f" {str(given.dtype).removeprefix('torch.')}"
        what_wanted += f" {str(wanted.dtype).removeprefix('torch.')}"
    return f"{name}: file {what_given}, model {what_wanted}"


def _describe(model: nn.Module) -> str:
    info = model_info(model)
    return f"{info.library} {info.name}" if info is not None else type(model).__name__


def _check_saved_model(model: nn.Module, source: WeightsSource) -> None:
    """A file dgc-convert wrote names its model: refuse one written for another architecture."""
    info, saved = model_info(model), source.metadata
    if info is None or not saved.get("format", "").startswith(_SAVED_FORMAT_PREFIX):
        return
    name, library = saved.get("model"), saved.get("library")
    if (name, library) != (info.name, info.library):
        raise WeightsFileError(f"{source.file}: holds {library} {name}; the model here is {_describe(model)}")


def load_dense_weights(model: nn.Module, path: str | Path) -> WeightsSource:
    """Copy the dense weights ``path`` names into ``model``, strictly; everything is checked before
    anything is copied, so a refused file leaves the model untouched.

    ``path`` is a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file, a
    file written by ``dgc_convert.save`` or a training run's ``last/`` or
    ``best/`` directory holding a dense model of the same architecture (see
    the module docstring for how wrapped files are read). Every tensor the
    model saves must be in the file with its shape, and every tensor of the
    file must be the model's; floating-point tensors of another precision are
    cast. A BatchNorm's ``num_batches_tracked`` counter may be absent, as
    torch's own strict loading allows (files from before it existed).

    Returns:
        A ``WeightsSource``: the file, the entry the weights sat under, the
        prefixes stripped and the number of tensors copied.

    Raises:
        WeightsFileError: one line naming the file and the reason: unreadable,
            not weights only, a converted DGC model, another model's file, or
            the keys missing, unexpected and differing in shape or dtype (the
            first few of each, with counts).
    """
    tensors, source = read_dense_weights(path)
    _check_saved_model(model, source)
    expected = model.state_dict()  # references to the model's own tensors: nothing is copied
    missing = [k for k in expected if k not in tensors and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    differing = [m for k, t in expected.items() if k in tensors and (m := _mismatch(k, tensors[k], t))]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key{'s' if len(missing) > 1 else ''} ({_listing(missing)})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} ({_listing(unexpected)})")
    if differing:
        shown = "; ".join(differing[:_SHOWN]) + ("; ..." if len(differing) > _SHOWN else "")
        problems.append(f"{len(differing)} differ in shape or dtype ({shown})")
    if problems:
        raise WeightsFileError(f"{source.file}: does not fit {_describe(model)}: {', '.join(problems)}")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:  # a module's own load hook refusing what the checks above let through
        raise WeightsFileError(f"{source.file}: does not fit {_describe(model)}: {first_line(error, 200)}") from None
    return source
