"""Communication layer of FSSDP and expert parallelism: one import point for the collectives.

- spAG / spRS of expert chunks over a placement (`sparse_collectives`): spag, spag_start, sprs, sprs_start.
- uneven all-to-all for token dispatch/combine (`all_to_all`): all_to_all_uneven, exchange_counts.
Every call adds the bytes this rank sends to `sparsetrain.telemetry.comm.COMM`.
"""
from __future__ import annotations

from sparsetrain.parallel.all_to_all import all_to_all_uneven, exchange_counts
from sparsetrain.parallel.sparse_collectives import (
    DEFAULT_TRANSPORT,
    TRANSPORTS,
    SpAGHandle,
    SparsePlan,
    SpRSHandle,
    plan_sparse,
    spag,
    spag_start,
    sprs,
    sprs_start,
)

__all__ = [
    "DEFAULT_TRANSPORT",
    "TRANSPORTS",
    "SpAGHandle",
    "SpRSHandle",
    "SparsePlan",
    "all_to_all_uneven",
    "exchange_counts",
    "plan_sparse",
    "spag",
    "spag_start",
    "sprs",
    "sprs_start",
]
