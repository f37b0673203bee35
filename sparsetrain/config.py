"""One typed config tree, loaded from YAML, strict about keys and types.

`load_config(path, overrides)` reads a preset, applies `--set a.b=value`
overrides, checks every key and type (errors name the key and the file) and
validates cross-field rules before any process starts (the rules: `sparsetrain.config_checks`,
re-exported here).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparsetrain.config_checks import (  # noqa: F401 (re-exported: `from sparsetrain.config import validate`)
    PEER_STRATEGIES,
    STRATEGY_NAMES,
    ConfigError,
    validate,
    validate_world,
)
from sparsetrain.textio import DuplicateKeyError, load_yaml, read_utf8


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    moe_every: int = 1  # MoE FFN on every k-th layer (1 = all); others get a dense MLP
    d_ffn_dense: int = 0  # dense MLP hidden size (0 = 4 * d_model)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    d_ffn: int = 256  # hidden size of one expert
    aux_loss_coef: float = 0.01  # load-balancing loss (Switch/GShard form; capacity mode: f over the rank's micro-batch)
    z_loss_coef: float = 0.001  # router z-loss
    balance: str = "aux_loss"  # aux_loss | aux_free (bias balancing, DeepSeek-V3)
    bias_update_rate: float = 0.001  # aux_free: step size of the expert bias update
    capacity_factor: float = 0.0  # 0 = dropless; > 0 = capacity mode: an expert takes at most
    # ceil(cf * tokens * top_k / E) slots of a rank's tokens; first choices kept before second (then by gate score)
    capacity_renorm: bool = True  # capacity mode, top_k > 1: rescale a token's surviving weights to sum to 1
    capacity_priority: str = "score"  # capacity mode, order within a choice rank: score (gate score, then token
    # order; batch-prioritized) | token (token order, as GShard / DeepSpeed top2gating)
    # benchmark routing workloads (sparsetrain/model/workloads.py; default: learned routing):
    router_skew: float = 0.0  # s > 0: each step's slot share per expert = Zipf(s) over a seeded expert permutation
    skew_seed: int = 0  # permutation seed (each MoE layer gets its own permutation)
    skew_drift_every: int = 0  # > 0: a new permutation (new hot set) every k steps
    routing_trace: str = ""  # expert_loads.jsonl to replay: step t's shares follow the trace's step t % len


@dataclass
class FSSDPConfig:
    keep_materialized: bool = False  # keep gathered copies for backward (no re-gather)
    planner: str = "hecate"  # placement planner registry key
    slots_per_rank: int = 2  # extra expert copies a rank may hold per layer (m)
    overlap_budget: int = -1  # chunks gatherable during attention (t); -1 = from the cost model, fixed at set-up
    cost_gate: bool = True  # a layer keeps copies only when the compute they save beats the bytes they move;
    # a re-shard happens only when the compute it saves until the next one beats the bytes it moves
    link_GBps: float = 0.0  # spAG/spRS bandwidth per rank for the cost model; 0 = device default, -1 = measure
    # once at set-up (kept in checkpoints; placement then depends on that measurement)
    expert_TFLOPs: float = 0.0  # expert GEMM throughput per rank for the cost model; 0 = device default, -1 =
    # measure once at set-up (fwd + bwd of the rank's experts; slowest rank; kept in checkpoints)
    load_window: int = 5  # steps averaged for the predicted load
    reshard_every: int = 0  # re-shard ownership every K steps (0 = never)
    reshard_early: bool = False  # with reshard_every and the cost gate: also re-shard between scheduled steps
    # when owners fitted to one step would have paid on the next (held out): follows a moved hot set within 2
    # steps; neutral on recorded traces, and host time after every step (docs/fssdp.md "Early re-shards")
    replan_every: int = 1  # re-plan the copies (P1) from the predicted load every k steps (> 1: EPLB-style periodic)
    prefetch: bool = True  # issue the next layer's spAG early (async)
    compress_chunks: bool = True  # N:M-masked experts travel compressed in spAG (when copies can use it)
    sprs_post: str = "auto"  # backward: post each layer's spRS from its input-grad hook (overlaps the
    # earlier layers' backward) | after: all after backward | auto: backward on CUDA, after on CPU (measured)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # ZeRO stage of the deepspeed_moe engine (0, 1 or 2)
    min_capacity: int = 0  # DeepSpeed's floor on an expert's capacity (its own default is 4; 0 = sparsetrain's formula)


@dataclass
class ParallelConfig:
    strategy: str = "fssdp"  # fssdp | ep | dp | none | deepspeed_moe | megatron_moe (peers, for benchmarks)
    dense: str = "fsdp2"  # fsdp2 | ddp
    fsdp_reshard_after_forward: str = "default"  # FSDP2 (as torchtitan): default = every block but the last
    # and not the root (they are needed again first in backward) | always | never (ZeRO-2-like: no re-gather)
    ep_size: int = 0  # expert-parallel group size (0 = world size)
    ep_placement: str = "contiguous"  # ep: contiguous expert blocks | balanced (best static placement for
    # the routing workload's mean load; needs moe.router_skew or moe.routing_trace)
    a2a_overlap: bool = True  # ep/fssdp: compute the slots a rank routes to itself while the dispatch
    # all-to-all is in flight (their backward while its reverse exchange is)
    pretend_nodes: int = 0  # treat the ranks as this many nodes (topology tests on one machine)
    fssdp: FSSDPConfig = field(default_factory=FSSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class SparsityConfig:
    enabled: bool = False
    n: int = 2
    m: int = 4
    method: str = "sr_ste"  # magnitude | sr_ste
    lambda_w: float = 2e-4
    modules: list[str] = field(default_factory=lambda: ["experts"])  # experts | mlp | attn
    transposable: bool = False
    refresh_every: int = 1  # recompute masks every k optimizer steps
    mask_decay_steps: int = 0  # pruned weights scaled by beta(t): 1 -> 0 over this many steps
    structure_decay: list[str] = field(default_factory=list)  # e.g. ["7:8", "4:8"] before n:m
    structure_decay_every: int = 0  # steps per structure-decay stage
    kernel: str = "auto"  # auto: N:M kernels picked per shape on CUDA, dense on CPU | reference | triton | cuda_2_4


@dataclass
class OffloadConfig:
    enabled: bool = False
    every_k_layers: int = 1  # offload saved activations of every k-th block
    min_tensor_bytes: int = 1 << 16  # smaller saved tensors stay on device
    checkpoint_activations: bool = False  # also recompute the selected blocks (their saved inputs get offloaded)
    prefetch: bool = True  # when backward reaches block i, start bringing block i-1's activations back
    pin_memory: bool = True  # CUDA: page-locked host buffers (async copies); ignored on CPU
    max_host_mib: float = 0.0  # host pool bound per device (0 = unbounded); tensors that do not fit stay on device


@dataclass
class DataConfig:
    corpus: str = "stdlib"  # "stdlib" (embedded bytes) or a shard directory (meta.json, or nanoGPT train.bin)
    batch_size: int = 16  # global batch (sequences) per optimizer step, split over dp ranks
    val_fraction: float = 0.05
    eval_batches: int = 8
    sampling: str = "random"  # random (seeded windows) | sequential (epochs of non-overlapping windows)
    val_split: str = "auto"  # files (the corpus's val shards) | fraction (tail of train) | auto
    tokenizer: str = "byte"  # byte | path/to/tokenizer.json | hf:<hub name> | tiktoken:<encoding>
    # `sparsetrain data prepare` / `train-tokenizer` read these:
    source: str = "stdlib"  # stdlib | file, directory or glob of text/JSONL/Parquet files | hf:<dataset or path>
    source_format: str = "auto"  # auto | text | jsonl | parquet | hf
    text_field: str = "text"  # JSONL key, Parquet column or dataset column holding the text
    hf_config: str = ""  # dataset configuration name (hf: sources)
    hf_split: str = "train"  # dataset split (hf: sources)
    shard_tokens: int = 100_000_000  # tokens per shard file
    prepare_workers: int = 0  # tokenizer processes (0 = one per CPU)


@dataclass
class TrainConfig:
    steps: int = 300
    seed: int = 1337
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    optimizer_impl: str = "fused"  # AdamW kernel: fused (one pass per tensor, no temporaries) | foreach | for-loop
    precision: str = "fp32"  # fp32 | bf16: fp32 master weights + Adam state; bf16 compute, FSDP2 all-gathers,
    # spAG expert chunks and token all-to-all
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16: every gradient reduction (FSDP2, spRS, flat all-reduces, peers)
    log_every: int = 10
    eval_every: int = 100
    out_dir: str = "runs/default"
    on_nan: str = "error"  # error | skip (drop the step, print it) | rollback (reload the last good checkpoint)
    max_skipped_steps: int = 5  # on_nan=skip/rollback: the run ends (non-zero exit) after more non-finite steps
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard | mlflow | wandb
    gpu_telemetry_s: float = 2.0  # NVML sampling interval per worker (0 = off; nothing happens without a GPU)
    peak_tflops: float = 0.0  # peak TFLOP/s of one rank for MFU; 0 = GPU device table (CPU: no MFU)
    cpu_exact_memory: bool = False  # CPU: glibc returns freed blocks >= 128 KiB so the RSS peak follows live
    # tensors (what `plan` counts) -- for memory measurements; steps run ~2x slower (page faults on every alloc)
    activation_checkpointing: str = "none"  # none | full (every block) | selective (every block's FFN: router+experts)


@dataclass
class CheckpointConfig:
    every: int = 0  # save every k steps (0 = only at the end if enabled)
    dir: str = ""  # default: <out_dir>/checkpoints
    resume: bool = True  # resume from the latest committed checkpoint in dir
    save_final: bool = True
    keep: int = 2  # committed checkpoints kept (0 = all)
    # `checkpoint.async` (a Python keyword, so the field is async_save): write in the background, commit after
    async_save: bool = field(default=False, metadata={"key": "async"})


@dataclass
class LaunchConfig:
    workers: int = 1
    backend: str = "ray"  # ray | torchrun | inline (single process, no launcher)
    address: str = ""  # Ray cluster address; empty = start a local runtime
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    torch_threads: int = 1  # intra-op threads per worker on CPU
    max_failures: int = 0  # restarts of the worker group after a rank dies or raises (resumes from the last checkpoint)
    timeout_s: float = 300.0  # collective timeout: a rank stalled this long fails the group (restarted by max_failures)
    resource_timeout_s: float = 600.0  # cluster runs: wait this long for the ranks' resources (a line every 30 s)
    min_workers: int = 0  # elastic: run on fewer ranks (>= this) when fewer can be placed, grad_accum raised; 0 = off


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


_REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # a checkout / editable install
CONFIG_DIR = _REPO_CONFIGS if _REPO_CONFIGS.is_dir() else Path(__file__).resolve().parent / "configs"  # a wheel


INT64_MAX = 2**63 - 1
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({source})")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config schema")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string; it is a float literal
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r} ({source})")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({source})")
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected str, got int {value!r} ({source}); quote it: YAML 1.1 reads an unquoted "
                          "N:M such as 7:8 as a base-60 number (write '7:8')")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r} ({source})")
    if tp is int and not -INT64_MAX <= value <= INT64_MAX:  # counters meet torch tensors and other runtimes
        raise ConfigError(f"{key}: {value} does not fit in 64 bits ({source})")
    return value


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys by full dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r} ({source})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = {f.metadata["key"]: f.name for f in dataclasses.fields(cls) if "key" in f.metadata}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        key = aliases.get(key, key)  # a YAML key that cannot be a field name (checkpoint.async)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{dotted}' in {source} (known here: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, dotted, source)
        else:
            kwargs[key] = _coerce(value, tp, dotted, source)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['a.b=1', 'c.d=x'] into a nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if any("\udc80" <= ch <= "\udcff" for ch in raw):  # bytes the shell's locale could not decode
            raise ConfigError(f"--set {key}: the value is not valid UTF-8 (check the shell's locale / the path's bytes)")
        try:
            value = load_yaml(raw, f"--set {key}") if raw != "" else ""
        except DuplicateKeyError as e:
            raise ConfigError(str(e)) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_preset(path: str | Path) -> Path:
    """Find a preset by path or by name under configs/ (e.g. 'tiny')."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"config file not found: {path} (presets: {', '.join(list_presets())})")


def list_presets() -> list[str]:
    return sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """Load a YAML preset (default: configs/tiny.yaml), apply overrides, validate (the world-dependent checks
    against `world_size`, default launch.workers)."""
    src = resolve_preset(path or "tiny")
    try:
        data = load_yaml(read_utf8(src, f"{src}: not UTF-8 text", ConfigError), str(src)) or {}
    except DuplicateKeyError as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: invalid YAML: {e}") from None
    cfg = _build(Config, data, "", str(src))
    if overrides:
        cfg = _build(Config, _merge(to_dict(cfg), parse_overrides(overrides)), "", "--set")
    validate(cfg, world_size)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (workers receive configs this way)."""
    cfg = _build(Config, data, "", "dict")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
