"""What one DGC layer computes: the layer, its training computation and its sparse inference kernels.

Knows nothing of models, files or training. See ``docs/method.md`` for the method.
"""

from dgc_convert.nn.layer import DGCConv2d, Gates, SaliencyGenerator, kept_channel_count

__all__ = ["DGCConv2d", "Gates", "SaliencyGenerator", "kept_channel_count"]
