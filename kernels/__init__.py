"""Compute kernels (imported as sparsetrain.kernels): torch references plus fast paths."""
from sparsetrain.kernels.grouped import grouped_linear, grouped_linear_reference

__all__ = ["grouped_linear", "grouped_linear_reference"]
