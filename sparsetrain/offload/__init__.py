"""Activation offload to host memory (see docs/offload.md)."""
from sparsetrain.offload.activation import OffloadController, enable_activation_offload, find_blocks
from sparsetrain.offload.pool import HostBufferPool

__all__ = ["HostBufferPool", "OffloadController", "enable_activation_offload", "find_blocks"]
