"""What identifies a tensor's current values without reading them, for the weight caches."""

from __future__ import annotations

from torch import Tensor

__all__ = ["tensor_state"]


def tensor_state(tensor: Tensor) -> tuple[object, ...]:
    """Storage, version (inference tensors keep none), dtype, device and shape: equal
    exactly while the tensor holds the same values (an in-place change bumps the version)."""
    version = None if tensor.is_inference() else tensor._version
    return (tensor.data_ptr(), version, tensor.dtype, tensor.device, tuple(tensor.shape))
