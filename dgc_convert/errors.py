"""Errors dgc-convert raises for bad input. Each message is one line that
names the culprit; the CLI prints it and exits with code 2."""


class DGCConvertError(ValueError):
    """Base class: a user-facing, one-line error about bad input."""


class UnknownModelError(DGCConvertError):
    """A model name neither timm nor torchvision can build."""


class ConversionError(DGCConvertError):
    """Conversion settings that cannot apply to this model."""


class IdentityCheckError(DGCConvertError):
    """A converted model that does not reproduce its original at zeta 0 and unit scores."""


class SettingsError(DGCConvertError):
    """A model or conversion setting outside what the recipe schema allows."""


class RecipeError(DGCConvertError):
    """A recipe file that does not load or validate."""
