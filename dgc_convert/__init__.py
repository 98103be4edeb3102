"""dgc-convert: Dynamic Group Convolution for any timm or torchvision CNN.

The public API is re-exported here; see README.md for a tour.
"""

from dgc_convert.layer import DGCConv2d, Gates, SaliencyGenerator, kept_channel_count

__version__ = "0.1.0"

__all__ = ["DGCConv2d", "Gates", "SaliencyGenerator", "kept_channel_count", "__version__"]
