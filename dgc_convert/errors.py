"""Every error dgc-convert raises for its users. Each message is one line
that names the culprit; the CLI prints it and exits with code 2 (1 for a run
that failed: a diverged training run, an export that does not match)."""

from __future__ import annotations

from typing import Any

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


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (its class name when empty), at most ``limit`` characters:
    how a library's multi-line error is quoted inside one of ours."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class DGCConvertError(ValueError):
    """Base class: a user-facing, one-line error about bad input."""


class UnknownModelError(DGCConvertError):
    """A model name neither timm nor torchvision can build."""


class ConversionError(DGCConvertError):
    """Conversion settings that cannot apply to this model."""


class IdentityCheckError(DGCConvertError):
    """A converted model that does not reproduce its original at zeta 0 and unit scores."""


class SettingsError(DGCConvertError):
    """A model, data or other setting outside what the recipe schema or the model library allows
    (conversion settings raise ``ConversionError``)."""


class RecipeError(DGCConvertError):
    """A recipe file that does not load or validate."""


class LoadError(DGCConvertError):
    """A model file that cannot be loaded; the message names the file and the reason."""


class WeightsFileError(LoadError):
    """A weights file to start from (``model.checkpoint``, ``--checkpoint``) that cannot be read or does
    not fit the model; the message names the file and the reason."""


class ExportError(DGCConvertError):
    """Export failed, or a missing export dependency."""


class DataError(DGCConvertError):
    """A data set cannot be found or read; the message says how to fix it."""


class CheckpointError(DGCConvertError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


class TrainingDiverged(DGCConvertError):
    """The loss became non-finite; the last good checkpoint is kept (exit 1 from the CLI)."""
