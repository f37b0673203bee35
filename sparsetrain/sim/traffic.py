"""Traffic of one collective as [src, dst] bytes, and its time on a cluster (per-rank, per link tier)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsetrain.parallel.placement import LayerPlacement
from sparsetrain.parallel.routing import candidates
from sparsetrain.parallel.topology import Topology
from sparsetrain.sim.cluster import Cluster


@dataclass
class Traffic:
    """Bytes each rank sends/receives per link tier, and peers it talks to ([world] each)."""

    send_intra: torch.Tensor
    send_inter: torch.Tensor
    recv_intra: torch.Tensor
    recv_inter: torch.Tensor
    peers_intra: torch.Tensor
    peers_inter: torch.Tensor

    @classmethod
    def from_matrix(cls, flow: torch.Tensor, topo: Topology) -> Traffic:
        """From bytes [src, dst] (the diagonal is local and ignored)."""
        node = torch.arange(topo.world) // topo.ranks_per_node
        same = node[:, None] == node[None, :]  # [world, world]
        off = flow * ~torch.eye(topo.world, dtype=torch.bool)
        intra, inter = off * same, off * ~same
        return cls(intra.sum(1), inter.sum(1), intra.sum(0), inter.sum(0),
                   ((intra > 0) | (intra.t() > 0)).sum(1).double(), ((inter > 0) | (inter.t() > 0)).sum(1).double())

    def reversed(self) -> Traffic:
        """The same exchange in the other direction (combine after dispatch, spRS after spAG)."""
        return Traffic(self.recv_intra, self.recv_inter, self.send_intra, self.send_inter,
                       self.peers_intra, self.peers_inter)

    def scaled(self, k: float) -> Traffic:
        """Bytes times k (same peers)."""
        return Traffic(self.send_intra * k, self.send_inter * k, self.recv_intra * k, self.recv_inter * k,
                       self.peers_intra, self.peers_inter)

    def rank_times(self, c: Cluster) -> torch.Tensor:
        """Seconds per rank [world]: each tier pays latency per peer + max(sent, received) / bandwidth;
        the two tiers run at the same time."""
        bw_i, lat_i = c.link(True)
        bw_o, lat_o = c.link(False)
        t_in = self.peers_intra * lat_i + torch.maximum(self.send_intra, self.recv_intra) / bw_i
        t_out = self.peers_inter * lat_o + torch.maximum(self.send_inter, self.recv_inter) / bw_o
        return torch.maximum(t_in, t_out)

    def time(self, c: Cluster) -> float:
        """Seconds of the collective: the slowest rank."""
        return float(self.rank_times(c).max())

    def latency_part(self, c: Cluster) -> float:
        """The latency share of the slowest rank's time."""
        i = int(self.rank_times(c).argmax())
        return float(self.peers_intra[i] * c.intra_node_latency_s + self.peers_inter[i] * c.inter_node_latency_s)


def dispatch_matrix(slots: float, shares: torch.Tensor, placement: LayerPlacement, topo: Topology) -> torch.Tensor:
    """Routed slots [src, dst] when every source routes `slots` slots by `shares` [E] under the runtime's replica
    rule (`routing.candidates`): a copy on the source, else the copies on its node, else all copies; an
    expert's slots split evenly over the candidates. The rule depends on the source only through its node and
    whether it holds a copy, so it is evaluated once per (node, expert) and applied to every source there."""
    world, num_experts = topo.world, placement.num_experts
    held = torch.zeros(world, num_experts, dtype=torch.float64)  # [src, E] 1 where src holds a copy
    for e, c in enumerate(placement.copies):
        held[list(c), e] = 1.0
    flow = torch.zeros(world, world, dtype=torch.float64)
    for node in range(topo.num_nodes):
        ranks = topo.ranks_of_node(node)
        to = torch.zeros(num_experts, world, dtype=torch.float64)  # [E, dst] split for a non-holding source
        for e, c in enumerate(placement.copies):
            src = next((r for r in ranks if r not in c), None)
            if src is None:
                continue  # every rank of the node holds e: always local
            cand = candidates(c, src, topo)
            to[e, list(cand)] = 1.0 / len(cand)
        rows = torch.tensor(ranks)
        remote = (slots * shares)[None, :] * (1 - held[rows])  # [rpn, E] slots that leave the source
        flow[rows] = remote @ to  # [rpn, E] @ [E, world] -> [rpn, world]
        flow[rows, rows] += (slots * shares[None, :] * held[rows]).sum(1)  # served by the source's own copy
    return flow


def spag_matrix(placement: LayerPlacement, world: int, chunk_bytes: float) -> torch.Tensor:
    """spAG bytes [owner, holder]: each owner sends its chunk to every non-owner copy."""
    m = torch.zeros(world, world, dtype=torch.float64)
    for o, c in zip(placement.owners, placement.copies):
        for r in c:
            if r != o:
                m[o, r] += chunk_bytes
    return m


def ring_time(bytes_per_rank: float, world: int, topo: Topology, c: Cluster) -> float:
    """All-gather / reduce-scatter over all ranks: bytes over the slowest ring link + 2 log2(world) latencies."""
    if world == 1:
        return 0.0
    bw, lat = c.link(topo.num_nodes == 1)
    return bytes_per_rank * (world - 1) / world / bw + 2 * math.log2(world) * lat
