"""One typed config tree, loaded from YAML, strict about keys and types.

`load_config(path, overrides)` reads a preset, applies `--set a.b=value`
overrides, checks every key and type (errors name the key and the file) and
validates cross-field rules before any process starts.
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


class ConfigError(ValueError):
    """A config problem; the message names the key and where it came from."""


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
    aux_loss_coef: float = 0.01  # load-balancing loss (Switch/GShard form)
    z_loss_coef: float = 0.001  # router z-loss
    balance: str = "aux_loss"  # aux_loss | aux_free (bias balancing, DeepSeek-V3)
    bias_update_rate: float = 0.001  # aux_free: step size of the expert bias update
    capacity_factor: float = 0.0  # 0 = dropless; > 0 = capacity mode: an expert takes at most
    # ceil(cf * tokens * top_k / E) slots of a rank's tokens; first choices kept before second (then by gate score)
    capacity_renorm: bool = True  # capacity mode, top_k > 1: rescale a token's surviving weights to sum to 1
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
    cost_gate: bool = True  # a layer keeps copies only when the compute they save beats the bytes they move
    link_GBps: float = 0.0  # spAG/spRS bandwidth per rank for the cost model; 0 = device default, -1 = measure
    # once at set-up (kept in checkpoints; placement then depends on that measurement)
    expert_TFLOPs: float = 0.0  # expert GEMM throughput per rank for the cost model; 0 = device default
    load_window: int = 5  # steps averaged for the predicted load
    reshard_every: int = 0  # re-shard ownership every K steps (0 = never)
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
    ep_size: int = 0  # expert-parallel group size (0 = world size)
    ep_placement: str = "contiguous"  # ep: contiguous expert blocks | balanced (best static placement for
    # the routing workload's mean load; needs moe.router_skew or moe.routing_trace)
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
    precision: str = "fp32"  # fp32 | bf16: fp32 master weights + Adam state; bf16 compute, FSDP2 all-gathers,
    # spAG expert chunks and token all-to-all
    grad_reduce_dtype: str = "fp32"  # bf16 runs: dtype of FSDP2 gradient reduce-scatter and spRS (fp32 | bf16)
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
    activation_checkpointing: str = "none"  # none | full (every block) | selective (every block's FFN: router+experts)


@dataclass
class CheckpointConfig:
    every: int = 0  # save every k steps (0 = only at the end if enabled)
    dir: str = ""  # default: <out_dir>/checkpoints
    resume: bool = True  # resume from the latest committed checkpoint in dir
    save_final: bool = True
    keep: int = 2  # committed checkpoints kept (0 = all)


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


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r} ({source})")
    return value


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys by full dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r} ({source})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
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
            value = yaml.safe_load(raw) if raw != "" else ""
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (default: configs/tiny.yaml), apply overrides, validate."""
    src = resolve_preset(path or "tiny")
    try:
        data = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{src}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: invalid YAML: {e}") from None
    cfg = _build(Config, data, "", str(src))
    if overrides:
        cfg = _build(Config, _merge(to_dict(cfg), parse_overrides(overrides)), "", "--set")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (workers receive configs this way)."""
    cfg = _build(Config, data, "", "dict")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


STRATEGY_NAMES = ("none", "dp", "ep", "fssdp", "deepspeed_moe", "megatron_moe")
PEER_STRATEGIES = ("deepspeed_moe", "megatron_moe")  # other runtimes' MoE layers, for side-by-side benchmarks


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """A choice field: `value` of dotted `key` must be one of `allowed` (the error lists them)."""
    _check(value in allowed, f"{key}={value!r}; allowed: {', '.join(allowed)}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Cross-field checks, run before anything starts."""
    m, e, t, p = cfg.model, cfg.moe, cfg.train, cfg.parallel
    _check(m.d_model > 0 and m.n_layers > 0 and m.n_heads > 0, "model: d_model, n_layers, n_heads must be > 0")
    _check(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _check((m.d_model // m.n_heads) % 2 == 0, f"model: head dim {m.d_model // m.n_heads} must be even for RoPE")
    _check(m.seq_len > 0, f"model.seq_len must be > 0, got {m.seq_len}")
    _check(m.moe_every >= 1, f"model.moe_every must be >= 1, got {m.moe_every}")
    _check(e.num_experts >= 1, f"moe.num_experts must be >= 1, got {e.num_experts}")
    _check(1 <= e.top_k <= e.num_experts, f"moe.top_k={e.top_k} must be in [1, moe.num_experts={e.num_experts}]")
    _check(e.d_ffn > 0, f"moe.d_ffn must be > 0, got {e.d_ffn}")
    _one_of("moe.balance", e.balance, ("aux_loss", "aux_free"))
    _check(e.capacity_factor >= 0, f"moe.capacity_factor must be >= 0, got {e.capacity_factor}")
    _check(e.router_skew >= 0, f"moe.router_skew must be >= 0, got {e.router_skew}")
    _check(e.skew_drift_every >= 0, f"moe.skew_drift_every must be >= 0, got {e.skew_drift_every}")
    _check(not (e.routing_trace and e.router_skew > 0), "set moe.routing_trace or moe.router_skew, not both")
    _check(e.skew_drift_every == 0 or e.router_skew > 0, "moe.skew_drift_every needs moe.router_skew > 0")
    if e.routing_trace:
        from sparsetrain.model.workloads import load_trace

        try:
            n = load_trace(e.routing_trace).shape[-1]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _check(n == e.num_experts, f"moe.routing_trace {e.routing_trace} has {n} experts, "
                                   f"moe.num_experts={e.num_experts}")
    _check(t.steps > 0, f"train.steps must be > 0, got {t.steps}")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _check(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _check(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    _one_of("train.precision", t.precision, ("fp32", "bf16"))
    _one_of("train.grad_reduce_dtype", t.grad_reduce_dtype, ("fp32", "bf16"))
    _one_of("train.on_nan", t.on_nan, ("error", "skip", "rollback"))
    from sparsetrain.preflight import check_counters  # the table of minimums lives beside the other pre-start checks

    check_counters(cfg)
    _one_of("train.device", t.device, ("auto", "cpu", "cuda"))
    _check_trackers(t.trackers)
    _check(t.gpu_telemetry_s >= 0, f"train.gpu_telemetry_s must be >= 0, got {t.gpu_telemetry_s}")
    _check(t.peak_tflops >= 0, f"train.peak_tflops must be >= 0 (0 = from the device table), got {t.peak_tflops}")
    _one_of("train.activation_checkpointing", t.activation_checkpointing, ("none", "full", "selective"))
    o = cfg.offload
    _check(o.every_k_layers >= 1, f"offload.every_k_layers must be >= 1, got {o.every_k_layers}")
    _check(o.min_tensor_bytes >= 0, f"offload.min_tensor_bytes must be >= 0, got {o.min_tensor_bytes}")
    _check(o.max_host_mib >= 0, f"offload.max_host_mib must be >= 0 (0 = unbounded), got {o.max_host_mib}")
    _check(cfg.data.batch_size >= 1, f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    _check(0 < cfg.data.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    _one_of("data.sampling", cfg.data.sampling, ("random", "sequential"))
    _one_of("data.val_split", cfg.data.val_split, ("auto", "files", "fraction"))
    _one_of("data.source_format", cfg.data.source_format, ("auto", "text", "jsonl", "parquet", "hf"))
    _check(cfg.data.shard_tokens > 0, f"data.shard_tokens must be > 0, got {cfg.data.shard_tokens}")
    _check(cfg.data.prepare_workers >= 0, f"data.prepare_workers must be >= 0, got {cfg.data.prepare_workers}")
    _one_of("parallel.strategy", p.strategy, STRATEGY_NAMES)
    _one_of("parallel.dense", p.dense, ("fsdp2", "ddp"))
    _one_of("parallel.ep_placement", p.ep_placement, ("contiguous", "balanced"))
    _check(p.ep_placement == "contiguous" or e.router_skew > 0 or bool(e.routing_trace),
           "parallel.ep_placement=balanced needs a known mean load: set moe.router_skew or moe.routing_trace")
    _one_of("parallel.fssdp.sprs_post", p.fssdp.sprs_post, ("auto", "backward", "after"))
    _check(p.fssdp.link_GBps >= 0 or p.fssdp.link_GBps == -1,
           f"parallel.fssdp.link_GBps={p.fssdp.link_GBps}; allowed: > 0, 0 (device default) or -1 (measure)")
    _check(p.fssdp.expert_TFLOPs >= 0, f"parallel.fssdp.expert_TFLOPs must be >= 0, got {p.fssdp.expert_TFLOPs}")
    _check(p.fssdp.replan_every >= 1, f"parallel.fssdp.replan_every must be >= 1, got {p.fssdp.replan_every}")
    _check(cfg.launch.workers >= 1, f"launch.workers must be >= 1, got {cfg.launch.workers}")
    _one_of("launch.backend", cfg.launch.backend, ("ray", "torchrun", "inline"))
    _check(cfg.launch.max_failures >= 0, f"launch.max_failures must be >= 0, got {cfg.launch.max_failures}")
    _check(cfg.launch.timeout_s >= 1, f"launch.timeout_s must be >= 1, got {cfg.launch.timeout_s}")
    _check(cfg.launch.resource_timeout_s > 0, f"launch.resource_timeout_s must be > 0, got {cfg.launch.resource_timeout_s}")
    if p.strategy in PEER_STRATEGIES:
        _validate_peer(cfg)
    s = cfg.sparsity
    if s.enabled:
        _check(0 < s.n <= s.m, f"sparsity: need 0 < n <= m, got {s.n}:{s.m}")
        _one_of("sparsity.method", s.method, ("magnitude", "sr_ste"))
        _one_of("sparsity.kernel", s.kernel, ("auto", "reference", "triton", "cuda_2_4"))
    world = world_size or cfg.launch.workers
    validate_world(cfg, world)


def _check_trackers(names: list[str]) -> None:
    """Known tracker names; mlflow/wandb must be installed when asked for (tensorboard is skipped if missing)."""
    import importlib.util

    for name in names:
        _one_of("train.trackers", name, ("tensorboard", "mlflow", "wandb"))
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.trackers lists {name!r} but the {name} package is not installed "
                              f"(pip install {name}, or remove it from train.trackers)")


def _validate_peer(cfg: Config) -> None:
    """What a peer runtime's MoE layer can do with our config (it has its own router and checkpoints)."""
    name, e = cfg.parallel.strategy, cfg.moe
    _check(cfg.checkpoint.every == 0, f"parallel.strategy={name} keeps its state in its own runtime; "
                                      f"sparsetrain checkpoints are not supported (set checkpoint.every=0)")
    _check(e.balance == "aux_loss", f"parallel.strategy={name} has no aux-loss-free bias (moe.balance=aux_free)")
    _check(e.router_skew == 0, f"parallel.strategy={name}: its router does not apply moe.router_skew (set it to 0)")
    _check(not cfg.sparsity.enabled, f"parallel.strategy={name} does not support sparsity.enabled")
    if name == "deepspeed_moe":
        _check(e.top_k in (1, 2), f"parallel.strategy=deepspeed_moe supports moe.top_k 1 or 2, got {e.top_k}")
        _check(cfg.parallel.deepspeed.zero_stage in (0, 1, 2),
               f"parallel.deepspeed.zero_stage={cfg.parallel.deepspeed.zero_stage}; allowed: 0, 1, 2")
        _check(cfg.parallel.deepspeed.min_capacity >= 0,
               f"parallel.deepspeed.min_capacity must be >= 0, got {cfg.parallel.deepspeed.min_capacity}")
    if name == "megatron_moe":
        import torch

        no_gpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and cfg.launch.gpus_per_worker == 0
                                                and not torch.cuda.is_available())
        _check(not no_gpu, "parallel.strategy=megatron_moe runs only on CUDA GPUs (Megatron-Core's MoELayer "
                           "does not run on CPU); on CPU use deepspeed_moe or ep")


def validate_world(cfg: Config, world: int) -> None:
    """Checks that depend on the number of ranks."""
    p, b = cfg.parallel, cfg.data.batch_size
    _check(b % (world * cfg.train.grad_accum) == 0,
           f"data.batch_size={b} is not divisible by launch.workers={world} x train.grad_accum={cfg.train.grad_accum}")
    _check(p.strategy != "none" or world == 1,
           f"parallel.strategy=none does no gradient synchronisation; with {world} workers use dp, ep or fssdp")
    if p.strategy in ("ep", "fssdp", *PEER_STRATEGIES) and world > 1:
        ep = p.ep_size or world
        _check(world % ep == 0, f"parallel.ep_size={ep} does not divide the world size {world}")
        if p.strategy != "fssdp":
            _check(cfg.moe.num_experts % ep == 0,
                   f"moe.num_experts={cfg.moe.num_experts} is not divisible by the expert-parallel size {ep}")
    if p.pretend_nodes and world > 1:
        _check(world % p.pretend_nodes == 0,
               f"parallel.pretend_nodes={p.pretend_nodes} does not divide the world size {world}")
