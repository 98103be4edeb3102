"""The model names of timm and torchvision, remembered per installed version of each.

Resolving a name (``recipe validate``, the CLI's first step) needs only the lists of names, but
asking a library for them means importing it, and importing torchvision loads torch and its
compiler stack: seconds. Each list is kept in a small JSON file named after the library and its
installed version (read from the package metadata, no import), so a later run finds a known name
without importing either library. A cache can only say yes: a name it lacks is looked up in the
library itself (a plugin may register more), and a cache that cannot be read or written is
skipped, never an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dgc_convert.files.atomic import atomic_write

__all__ = ["CACHE_DIR_VARIABLE", "cache_directory", "cached_names", "remember_names"]

# Where the lists go: this variable when set, else $XDG_CACHE_HOME/dgc-convert, else ~/.cache/dgc-convert.
CACHE_DIR_VARIABLE = "DGC_CONVERT_CACHE_DIR"
_MAX_BYTES = 8 << 20  # a list of model names is a few hundred KiB; anything larger is not ours


def cache_directory() -> Path:
    """The directory the name lists are kept in (not created here)."""
    given = os.environ.get(CACHE_DIR_VARIABLE)
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dgc-convert"


def _file(library: str, kind: str) -> Path | None:
    try:
        installed = version(library)
    except PackageNotFoundError:
        return None
    return cache_directory() / f"model-names-{library}{'-' + kind if kind else ''}-{installed}.json"


def cached_names(library: str, kind: str = "") -> frozenset[str] | None:
    """The names ``library`` could build when its installed version last listed them (``kind``:
    which list, e.g. "tags" for timm's ARCH.TAG names), or None when there is no readable list."""
    file = _file(library, kind)
    if file is None:
        return None
    try:
        if file.stat().st_size > _MAX_BYTES:
            return None
        names = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return None
    return frozenset(names)


def remember_names(library: str, list_names: Callable[[], list[str]], kind: str = "") -> list[str]:
    """``list_names()`` (the library asked, imported), written to the cache for its installed
    version on the way (atomically; skipped when the cache directory cannot be written)."""
    names = list_names()
    file = _file(library, kind)
    if file is not None and cached_names(library, kind) != frozenset(names):
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(file) as temporary:
                temporary.write_text(json.dumps(sorted(names)), encoding="utf-8")
        except OSError:
            pass  # a read-only home or a full disk: the names were still listed
    return names
