"""N:M structured sparsity: masks, SR-STE, decay schedules, model converter, compressed export."""
from sparsetrain.kernels.nm_format import NMCompressed, compress_nm, decompress, is_nm_sparse
from sparsetrain.sparsity.compressed import from_compressed_state_dict, state_dict_nbytes, to_compressed_state_dict
from sparsetrain.sparsity.config import NMConfig, parse_nm
from sparsetrain.sparsity.export import export_compressed, load_compressed
from sparsetrain.sparsity.masks import kept_fraction, nm_mask, select_mask, transposable_nm_mask
from sparsetrain.sparsity.schedule import beta_at, mask_decay_beta, structure_stage
from sparsetrain.sparsity.sparsify import (
    NMExpertTransform,
    NMParametrization,
    NMSparsifier,
    NMState,
    apply_sparsity,
    default_filter,
    masked_state_dict,
    nm_sparsifier,
    sparsify_,
)
from sparsetrain.sparsity.srste import SRSTE, masked_weight, sr_ste

__all__ = [
    "SRSTE",
    "NMCompressed",
    "NMConfig",
    "NMExpertTransform",
    "NMParametrization",
    "NMSparsifier",
    "NMState",
    "apply_sparsity",
    "beta_at",
    "compress_nm",
    "decompress",
    "default_filter",
    "export_compressed",
    "from_compressed_state_dict",
    "is_nm_sparse",
    "kept_fraction",
    "load_compressed",
    "mask_decay_beta",
    "masked_state_dict",
    "masked_weight",
    "nm_mask",
    "nm_sparsifier",
    "parse_nm",
    "select_mask",
    "sparsify_",
    "sr_ste",
    "state_dict_nbytes",
    "structure_stage",
    "to_compressed_state_dict",
    "transposable_nm_mask",
]
