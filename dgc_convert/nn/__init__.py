"""What one DGC layer computes: the layer, its training computation and its sparse inference kernels.

Knows nothing of models, files or training. See ``docs/method.md`` for the method. The names
below load on first use (PEP 562), so ``dgc_convert.nn.settings`` is read without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dgc_convert.nn.layer import DGCConv2d, Gates, SaliencyGenerator, kept_channel_count

__all__ = ["DGCConv2d", "Gates", "SaliencyGenerator", "kept_channel_count"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'dgc_convert.nn' has no attribute {name!r}")
    value = getattr(importlib.import_module("dgc_convert.nn.layer"), name)
    globals()[name] = value
    return value
