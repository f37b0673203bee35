"""Traffic of one collective as [src, dst] bytes, and its time on a cluster (per-rank, per link tier)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsetrain.parallel.placement import LayerPlacement
from sparsetrain.parallel.routing import copy_mask
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
        """From bytes [src, dst] (the diagonal is local and ignored). Works on the node blocks of the diagonal
        and a few whole-matrix passes, so 4096 ranks cost a fraction of a second."""
        n, r = topo.num_nodes, topo.ranks_per_node
        blocks = flow.view(n, r, n, r).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()  # [nodes, r, r] in-node
        blocks.diagonal(dim1=1, dim2=2).zero_()  # a rank's own slots stay local
        send_intra, recv_intra = blocks.sum(2).flatten(), blocks.sum(1).flatten()
        own = flow.diagonal()
        send_inter = flow.sum(1) - own - send_intra
        recv_inter = flow.sum(0) - own - recv_intra
        nz = flow > 0
        nz |= nz.t().clone()  # [world, world] peers talk in either direction
        nz.fill_diagonal_(False)
        nzb = nz.view(n, r, n, r).diagonal(dim1=0, dim2=2)  # [r, r, nodes] in-node part
        peers_intra = nzb.sum(1).t().flatten().double()
        peers_inter = nz.sum(1).double() - peers_intra
        return cls(send_intra, send_inter.clamp_min(0), recv_intra, recv_inter.clamp_min(0), peers_intra, peers_inter)

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
    whether it holds a copy, so it is evaluated for all sources at once (tests check it against `candidates`)."""
    world, n, r = topo.world, topo.num_nodes, topo.ranks_per_node
    held = copy_mask(placement, world)  # [E, world] 1 where a rank holds a copy
    per_slot = slots * shares.to(torch.float64)  # [E] slots per source per expert
    per_node = held.view(-1, n, r).sum(2)  # [E, nodes] copies on each node
    near = (per_node > 0).double().repeat_interleave(r, dim=1).t()  # [world, E] source's node has a copy
    remote = (1 - held.t()) * per_slot  # [world, E] slots that leave the source
    flow = (remote * (1 - near)) @ (held / held.sum(1, keepdim=True))  # [world, world] to all copies evenly
    local = held.view(-1, n, r) / per_node.clamp_min(1)[..., None]  # [E, nodes, r] the node's copies evenly
    blocks = torch.bmm((remote * near).view(n, r, -1), local.permute(1, 0, 2))  # [nodes, r(src), r(dst)]
    flow.view(n, r, n, r).diagonal(dim1=0, dim2=2).add_(blocks.permute(1, 2, 0))
    flow.diagonal().add_((held.t() * per_slot).sum(1))  # served by the source's own copy
    return flow


def spag_matrix(placement: LayerPlacement, world: int, chunk_bytes: float) -> torch.Tensor:
    """spAG bytes [owner, holder]: each owner sends its chunk to every non-owner copy."""
    pairs = [(o, h) for o, c in zip(placement.owners, placement.copies) for h in c if h != o]
    m = torch.zeros(world, world, dtype=torch.float64)
    if pairs:
        idx = torch.tensor(pairs).t()
        m.index_put_((idx[0], idx[1]), torch.full((len(pairs),), float(chunk_bytes), dtype=torch.float64),
                     accumulate=True)
    return m


def ring_time(bytes_per_rank: float, world: int, topo: Topology, c: Cluster) -> float:
    """All-gather / reduce-scatter over all ranks: bytes over the slowest ring link + 2 log2(world) latencies."""
    if world == 1:
        return 0.0
    bw, lat = c.link(topo.num_nodes == 1)
    return bytes_per_rank * (world - 1) / world / bw + 2 * math.log2(world) * lat
