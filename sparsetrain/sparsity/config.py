"""NMConfig: one dataclass for every N:M training recipe (magnitude, SR-STE, decays, transposable)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

METHODS = ("magnitude", "sr_ste")
MODULE_KINDS = ("experts", "mlp", "attn")
KERNELS = ("auto", "reference", "triton", "cuda_2_4")


def parse_nm(spec: str) -> tuple[int, int]:
    """'2:4' -> (2, 4), validated 0 < n <= m."""
    try:
        n_s, m_s = spec.split(":")
        n, m = int(n_s), int(m_s)
    except (ValueError, AttributeError):
        raise ValueError(f"N:M pattern must look like '2:4', got {spec!r}") from None
    if not 0 < n <= m:
        raise ValueError(f"N:M pattern {spec!r} needs 0 < n <= m")
    return n, m


@dataclass
class NMConfig:
    """N:M sparse-training options; target pattern n:m along each weight's input dim."""

    n: int = 2
    m: int = 4
    method: str = "sr_ste"  # magnitude | sr_ste
    lambda_w: float = 2e-4  # SR-STE decay on pruned weights
    transposable: bool = False  # mask N:M along rows and columns (greedy per m x m tile)
    refresh_every: int = 1  # recompute masks every k optimizer steps (1 = every forward)
    mask_decay_steps: int = 0  # pruned weights scaled by beta(t): 1 -> 0 over this many steps (per stage)
    structure_decay: list[str] = field(default_factory=list)  # denser stages before n:m, e.g. ['7:8', '4:8']
    structure_decay_every: int = 0  # optimizer steps per structure-decay stage
    modules: list[str] = field(default_factory=lambda: ["experts"])  # experts | mlp | attn
    kernel: str = "auto"  # auto (dispatcher; dense on CPU) | reference (dense masked GEMM) | triton | cuda_2_4

    def __post_init__(self) -> None:
        parse_nm(f"{self.n}:{self.m}")
        if self.method not in METHODS:
            raise ValueError(f"NMConfig.method={self.method!r}; allowed: {', '.join(METHODS)}")
        if self.lambda_w < 0:
            raise ValueError(f"NMConfig.lambda_w must be >= 0, got {self.lambda_w}")
        if self.refresh_every < 1:
            raise ValueError(f"NMConfig.refresh_every must be >= 1, got {self.refresh_every}")
        if self.mask_decay_steps < 0 or self.structure_decay_every < 0:
            raise ValueError("NMConfig.mask_decay_steps and structure_decay_every must be >= 0, got "
                             f"{self.mask_decay_steps}, {self.structure_decay_every}")
        if self.kernel not in KERNELS:
            raise ValueError(f"NMConfig.kernel={self.kernel!r}; allowed: {', '.join(KERNELS)}")
        bad = [k for k in self.modules if k not in MODULE_KINDS]
        if bad:
            raise ValueError(f"NMConfig.modules has {bad}; allowed: {', '.join(MODULE_KINDS)}")
        for spec in self.structure_decay:
            _n, m = parse_nm(spec)
            if self.m % m and m % self.m:
                raise ValueError(f"structure stage {spec!r}: m={m} must divide or be a multiple of target m={self.m}")
        if self.structure_decay and self.structure_decay_every == 0:
            raise ValueError("NMConfig.structure_decay is set but structure_decay_every is 0")
        if self.transposable and any(parse_nm(s)[1] != self.m for s in self.structure_decay):
            raise ValueError("transposable masks need every structure stage to use the target m")

    def stages(self) -> list[tuple[int, int]]:
        """Structure-decay stages followed by the target (n, m)."""
        return [parse_nm(s) for s in self.structure_decay] + [(self.n, self.m)]

    @classmethod
    def from_config(cls, sc: Any) -> NMConfig:
        """Build from sparsetrain.config.SparsityConfig (or any object with the same fields)."""
        return cls(n=sc.n, m=sc.m, method=sc.method, lambda_w=sc.lambda_w, transposable=sc.transposable,
                   refresh_every=sc.refresh_every, mask_decay_steps=sc.mask_decay_steps,
                   structure_decay=list(sc.structure_decay), structure_decay_every=sc.structure_decay_every,
                   modules=list(sc.modules), kernel=getattr(sc, "kernel", "auto"))
