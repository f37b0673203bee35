"""Cluster descriptions for the simulator: GPUs per node, link bandwidth/latency, FLOP/s (configs/clusters/)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from sparsetrain.config import CONFIG_DIR
from sparsetrain.textio import DuplicateKeyError, load_yaml

CLUSTER_DIR = CONFIG_DIR / "clusters"


@dataclass(frozen=True)
class Cluster:
    """Numbers per GPU (or per rank on a CPU host); bandwidths are bytes/s each way."""

    name: str
    gpus_per_node: int
    intra_node_Bps: float
    intra_node_latency_s: float
    inter_node_Bps: float
    inter_node_latency_s: float
    peak_flops: float  # for MFU
    achievable_flops: float  # what GEMM-heavy training compute reaches per rank
    layer_overhead_s: float = 0.0  # fixed cost per layer pass (kernel launches / interpreter)
    hbm_bytes: int = 0  # memory per rank (0 = not checked)
    hbm_Bps: float = 0.0  # memory bandwidth (optimizer step); 0 = ignore the optimizer
    bwd_fwd_ratio: float = 2.0  # backward compute / forward compute
    optimizer_s_per_param: float = 0.0  # measured alternative to hbm_Bps (calibrated CPU hosts)
    step_overhead_s: float = 0.0  # per step, outside layers (calibrated hosts: loss, clipping, bookkeeping)
    device: str = "cuda"  # cuda | cpu: where spRS overlaps backward under sprs_post=auto (as the runtime)
    cpu_share: float = 1.0  # share of a core each rank gets (CPU hosts: busy CPU time / wall time of compute)
    cores: int = 0  # CPU hosts: cores the local ranks share (more ranks than cores split them); 0 = one per rank
    # local work of an all-to-all per routed slot and exchange (sort, gather, scatter of the rank's slots);
    # calibrated hosts fit it beside a bulk bandwidth measured on spRS rows; 0 = inside the link numbers
    dispatch_s_per_slot: float = 0.0

    def rank_share(self, world: int) -> float:
        """Share of a core each of `world` local ranks gets: cpu_share, split further when ranks outnumber cores."""
        ranks = min(world, self.gpus_per_node)
        return self.cpu_share * (min(1.0, self.cores / ranks) if self.cores else 1.0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("gpus_per_node", "cores", "hbm_bytes"):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"cluster {self.name}: {f.name} must be a whole number, got {v!r}")
            elif f.name not in ("name", "device") and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                       or not math.isfinite(v)):
                raise ValueError(f"cluster {self.name}: {f.name} must be a finite number, got {v!r}")
        for f in ("intra_node_Bps", "inter_node_Bps", "peak_flops", "achievable_flops", "cpu_share", "bwd_fwd_ratio"):
            if not getattr(self, f) > 0:
                raise ValueError(f"cluster {self.name}: {f} must be > 0, got {getattr(self, f)}")
        for f in ("intra_node_latency_s", "inter_node_latency_s", "layer_overhead_s", "hbm_Bps",
                  "optimizer_s_per_param", "step_overhead_s", "dispatch_s_per_slot", "hbm_bytes", "cores"):
            if getattr(self, f) < 0:
                raise ValueError(f"cluster {self.name}: {f} must be >= 0, got {getattr(self, f)}")
        if self.cpu_share > 1:
            raise ValueError(f"cluster {self.name}: cpu_share is a share of one core, in (0, 1]; got {self.cpu_share}")
        if self.achievable_flops > self.peak_flops:
            raise ValueError(f"cluster {self.name}: achievable_flops {self.achievable_flops:.4g} exceeds peak_flops "
                             f"{self.peak_flops:.4g} (MFU would pass 100%)")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"cluster {self.name}: device must be cuda or cpu, got {self.device!r}")
        if self.gpus_per_node < 1:
            raise ValueError(f"cluster {self.name}: gpus_per_node must be >= 1, got {self.gpus_per_node}")

    def link(self, same_node: bool) -> tuple[float, float]:
        """(bandwidth bytes/s, latency s) of one link tier."""
        if same_node:
            return self.intra_node_Bps, self.intra_node_latency_s
        return self.inter_node_Bps, self.inter_node_latency_s

    def to_yaml(self) -> str:
        """YAML text loadable by `load_cluster`."""
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def list_clusters() -> list[str]:
    """Names of the shipped cluster descriptions."""
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))


def _number(path: Path, key: str, v: object) -> object:
    """A numeric field YAML read as a string (PyYAML reads `1e9` as one) as its number; other values as they are."""
    if not isinstance(v, str) or key in ("name", "device"):
        return v
    try:
        return int(v) if key in ("gpus_per_node", "cores", "hbm_bytes") and v.strip().isdigit() else float(v)
    except ValueError:
        raise ValueError(f"{path}: {key} must be a number, got {v!r}") from None


def load_cluster(name_or_path: str | Path) -> Cluster:
    """A cluster by name under configs/clusters/ or by YAML path; unknown keys are errors."""
    p = Path(name_or_path)
    if not p.exists():
        p = CLUSTER_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        raise ValueError(f"unknown cluster {name_or_path!r}; known: {', '.join(list_clusters())} (or a YAML path)")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"), str(p)) or {}
    except DuplicateKeyError as e:
        raise ValueError(str(e)) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{p}: not a readable cluster YAML ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):  # ValueError as every other bad cluster file: the CLI reports those in one line
        raise ValueError(f"{p}: a cluster file is a mapping of keys (name, gpus_per_node, ...), "  # noqa: TRY004
                         f"got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(Cluster)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{p}: unknown cluster key(s) {unknown}; allowed: {sorted(fields)}")
    data.setdefault("name", p.stem)
    try:
        return Cluster(**{k: _number(p, k, v) for k, v in data.items() if k != "name"}, name=str(data["name"]))
    except TypeError as e:
        raise ValueError(f"{p}: {e}") from None
