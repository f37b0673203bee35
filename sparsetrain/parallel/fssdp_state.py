"""FSSDP state saved with checkpoints, so a crash + resume continues exactly as if never stopped.

Saved (JSON, in the checkpoint's trainer_state.json): the load tracker, expert ownership per layer,
the materialization plan (copies) in force for the next step, the overlap budget it was planned with and
the bandwidth behind it and the copy cost gate (measured once when `link_GBps: -1`), and the re-shard counters. On
resume into the same world size and topology, ownership is restored before the weights are loaded (this
rank then holds the rows of the experts it owned when the checkpoint was written, and the checkpoint's
per-expert keys fill them) and the saved plan is used as is. On another world size or topology the
tracker carries over and ownership starts from the contiguous default (the checkpoint still loads: its
keys are per expert).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsetrain.model.experts import EXPERT_WEIGHTS
from sparsetrain.model.gpt import GPT
from sparsetrain.parallel import fssdp_machine
from sparsetrain.parallel.placement import LayerPlacement

FSSDPStrategy = Any  # sparsetrain.parallel.fssdp.FSSDP, not imported: it imports this module


def extra_state(s: FSSDPStrategy) -> dict[str, Any]:
    """JSON-able FSSDP state (see the module docstring)."""
    st = s.tracker.state_dict()
    return {"tracker": {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in st.items()},
            "reshards": s.reshards, "reshard_moves": s.reshard_moves, "reshards_gated": s.reshards_gated,
            "early_reshards": s.early_reshards,
            "world": s.info.world, "nodes": s.topo.num_nodes,
            "owners": [list(o) for o in s.owners], "copies": [[list(c) for c in p.copies] for p in s.placements],
            "overlap_budget": s.overlap_budget, "bandwidth": s.bandwidth, "expert_flops": s.expert_flops}


def _valid_layout(s: FSSDPStrategy, state: dict[str, Any]) -> bool:
    """Whether the saved ownership/plan fits this run (same world, nodes, layers, experts)."""
    owners, copies = state.get("owners"), state.get("copies")
    if state.get("world") != s.info.world or state.get("nodes") != s.topo.num_nodes:
        return False
    if not isinstance(owners, list) or not isinstance(copies, list) or len(owners) != s.num_layers \
            or len(copies) != s.num_layers:
        return False
    e, w = s.cfg.moe.num_experts, s.info.world
    return all(len(o) == e and len(c) == e and all(0 <= int(r) < w for r in o)
               and all(0 <= int(r) < w for rs in c for r in rs) for o, c in zip(owners, copies))


def reown(s: FSSDPStrategy, model: GPT, owners: list[list[int]]) -> None:
    """Hold the rows of the experts `owners` gives this rank (zeros: the checkpoint load fills them)."""
    params: set[nn.Parameter] = set()
    for li, moe in enumerate(model.moe_layers()):
        mod = moe.experts
        ids = [x for x, o in enumerate(owners[li]) if o == s.info.rank]
        for w in EXPERT_WEIGHTS:
            old = getattr(mod, w)
            setattr(mod, w, nn.Parameter(old.detach().new_zeros(len(ids), *old.shape[1:])))  # [n_owned, out, in]
        mod.expert_ids = ids
        params |= {getattr(mod, w) for w in EXPERT_WEIGHTS}
    s._expert_params = params
    s.owners = owners


def load_extra_state(s: FSSDPStrategy, state: dict[str, Any], model: GPT) -> None:
    """Restore what extra_state saved; call before the checkpoint's tensors are loaded."""
    tr = state["tracker"]
    s.tracker.load_state_dict({k: (torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v)
                               for k, v in tr.items()})
    s.reshards = int(state.get("reshards", 0))
    s.reshard_moves = int(state.get("reshard_moves", 0))
    s.reshards_gated = int(state.get("reshards_gated", 0))
    s.early_reshards = int(state.get("early_reshards", 0))
    if not _valid_layout(s, state):
        s._replan()
        return
    if s.fcfg.link_GBps < 0 or s.fcfg.expert_TFLOPs < 0:  # measured once per job, not again on every restart
        fssdp_machine.set_machine_numbers(s, model.moe_layers()[0].experts,
                               {k: float(state[k]) for k in ("bandwidth", "expert_flops") if state.get(k)})
    owners = [[int(o) for o in layer] for layer in state["owners"]]
    if owners != s.owners:
        reown(s, model, owners)
    s.overlap_budget = int(state["overlap_budget"])
    s._replan([LayerPlacement.from_lists(o, c) for o, c in zip(owners, state["copies"])])
