"""Rank topology: which ranks share a node (a `LOCAL_WORLD_SIZE` group).

Ranks are numbered node-major: node n holds ranks `n * ranks_per_node ... (n + 1) * ranks_per_node - 1`,
which is how torchrun and Ray Train assign global ranks. Pure data, hashable, identical on every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """`world` ranks in nodes of `ranks_per_node` consecutive ranks."""

    world: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"Topology.world must be a positive int, got {self.world!r}")
        if not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1:
            raise ValueError(f"Topology.ranks_per_node must be a positive int, got {self.ranks_per_node!r}")
        if self.world % self.ranks_per_node != 0:
            raise ValueError(
                f"Topology.world={self.world} is not divisible by ranks_per_node={self.ranks_per_node}; "
                f"allowed ranks_per_node: divisors of {self.world}"
            )

    @property
    def num_nodes(self) -> int:
        """Number of nodes."""
        return self.world // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        """Node index of `rank`."""
        self._check_rank(rank)
        return rank // self.ranks_per_node

    def ranks_of_node(self, node: int) -> list[int]:
        """Ranks of `node`, ascending."""
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node={node} out of range; allowed 0..{self.num_nodes - 1}")
        start = node * self.ranks_per_node
        return list(range(start, start + self.ranks_per_node))

    def same_node(self, a: int, b: int) -> bool:
        """True when ranks `a` and `b` share a node."""
        return self.node_of(a) == self.node_of(b)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank={rank} out of range; allowed 0..{self.world - 1}")

    @classmethod
    def from_env(cls, world: int, pretend_nodes: int = 0) -> Topology:
        """Topology from `LOCAL_WORLD_SIZE` (default: one node), or `pretend_nodes` equal nodes when > 0."""
        if pretend_nodes < 0:
            raise ValueError(f"pretend_nodes must be >= 0 (0 = read LOCAL_WORLD_SIZE), got {pretend_nodes}")
        if pretend_nodes > 0:
            if world % pretend_nodes != 0:
                raise ValueError(
                    f"pretend_nodes={pretend_nodes} does not divide world={world}; allowed: divisors of {world}"
                )
            return cls(world=world, ranks_per_node=world // pretend_nodes)
        raw = os.environ.get("LOCAL_WORLD_SIZE", "")
        if raw == "":
            return cls(world=world, ranks_per_node=world)
        try:
            local = int(raw)
        except ValueError:
            raise ValueError(f"LOCAL_WORLD_SIZE={raw!r} is not an integer") from None
        if local < 1 or world % local != 0:
            raise ValueError(f"LOCAL_WORLD_SIZE={local} does not divide world={world}; "
                             f"allowed: divisors of {world} (or set pretend_nodes)")
        return cls(world=world, ranks_per_node=local)
