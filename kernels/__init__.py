"""Compute kernels (imported as sparsetrain.kernels): torch references plus fast paths.

Triton is imported lazily by the 'triton' N:M path only, never at import time.
"""
from sparsetrain.kernels.grouped import (
    compute_dtype,
    cpu_row_blocks,
    grouped_linear,
    grouped_linear_reference,
    grouped_mm_dims_ok,
    grouped_mm_eligible,
    grouped_mm_input_eligible,
    host_to_device,
    swiglu_experts_reference,
)
from sparsetrain.kernels.nm_dispatch import (
    choose_path,
    grouped_nm_linear,
    grouped_nm_linear_reference,
    nm_linear,
    set_benchmark_table,
    table_key,
)
from sparsetrain.kernels.nm_format import NMCompressed, compress_nm, decompress, is_nm_sparse
from sparsetrain.kernels.nm_paths import NM_PATHS, NMPath, get_path

__all__ = [
    "NM_PATHS",
    "NMCompressed",
    "NMPath",
    "choose_path",
    "compress_nm",
    "compute_dtype",
    "cpu_row_blocks",
    "decompress",
    "get_path",
    "grouped_linear",
    "grouped_linear_reference",
    "grouped_mm_dims_ok",
    "grouped_mm_eligible",
    "grouped_mm_input_eligible",
    "grouped_nm_linear",
    "grouped_nm_linear_reference",
    "host_to_device",
    "is_nm_sparse",
    "nm_linear",
    "set_benchmark_table",
    "swiglu_experts_reference",
    "table_key",
]
