"""The installed dgc-convert version: read once from the package metadata (written in pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("dgc-convert")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
