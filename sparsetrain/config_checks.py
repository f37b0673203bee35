"""Config validation: the cross-key rules and their error messages, run before any process starts.

`validate(cfg)` checks choices, ranges and combinations (each error names the key, the value and
what is allowed); `validate_world(cfg, world)` adds the checks that depend on the number of ranks.
`sparsetrain.config` re-exports both (and `ConfigError`); the schema and the YAML loading live there.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

# train.optimizer_impl -> torch.optim.AdamW keyword arguments (sparsetrain.train.optim.build_optimizer)
OPTIMIZER_IMPLS: dict[str, dict[str, bool]] = {"fused": {"fused": True}, "foreach": {"foreach": True},
                                               "for-loop": {"foreach": False}}

if TYPE_CHECKING:  # the schema module imports this one (load_config validates)
    from sparsetrain.config import Config


class ConfigError(ValueError):
    """A config problem; the message names the key and where it came from."""


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
    _check_finite(cfg)
    _check(m.rope_theta > 0 and m.norm_eps > 0 and m.init_std > 0,
           f"model: rope_theta, norm_eps and init_std must be > 0, got {m.rope_theta}, {m.norm_eps}, {m.init_std}")
    _check(e.aux_loss_coef >= 0 and e.z_loss_coef >= 0 and e.bias_update_rate >= 0,
           f"moe: aux_loss_coef, z_loss_coef and bias_update_rate must be >= 0, got {e.aux_loss_coef}, "
           f"{e.z_loss_coef}, {e.bias_update_rate}")
    _check(m.d_model > 0 and m.n_layers > 0 and m.n_heads > 0, "model: d_model, n_layers, n_heads must be > 0")
    _check(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _check((m.d_model // m.n_heads) % 2 == 0, f"model: head dim {m.d_model // m.n_heads} must be even for RoPE")
    _check(m.seq_len > 0, f"model.seq_len must be > 0, got {m.seq_len}")
    _check(m.moe_every >= 1, f"model.moe_every must be >= 1, got {m.moe_every}")
    _check(e.num_experts >= 1, f"moe.num_experts must be >= 1, got {e.num_experts}")
    _check(1 <= e.top_k <= e.num_experts, f"moe.top_k={e.top_k} must be in [1, moe.num_experts={e.num_experts}]")
    _check(e.d_ffn > 0, f"moe.d_ffn must be > 0, got {e.d_ffn}")
    _one_of("moe.balance", e.balance, ("aux_loss", "aux_free"))
    _one_of("moe.capacity_priority", e.capacity_priority, ("score", "token"))
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
    _check(bool(t.out_dir.strip()), "train.out_dir is empty: set it to the run's output directory (an empty one "
                                    "would write checkpoints and logs into the current directory)")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    _check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"train.beta1, beta2 must be in [0, 1), got {t.beta1}, {t.beta2}")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _check(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _check(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    _one_of("train.precision", t.precision, ("fp32", "bf16"))
    _one_of("train.grad_reduce_dtype", t.grad_reduce_dtype, ("fp32", "bf16"))
    _one_of("train.optimizer_impl", t.optimizer_impl, tuple(OPTIMIZER_IMPLS))
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
    _check(not (o.enabled and o.checkpoint_activations and t.activation_checkpointing == "full"),
           "offload.checkpoint_activations=true has no effect with train.activation_checkpointing=full (every "
           "block is recomputed already; offload moves the checkpoint inputs): set one of them")
    _check(cfg.data.batch_size >= 1, f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    _check(0 < cfg.data.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    _one_of("data.sampling", cfg.data.sampling, ("random", "sequential"))
    _one_of("data.val_split", cfg.data.val_split, ("auto", "files", "fraction"))
    _one_of("data.source_format", cfg.data.source_format, ("auto", "text", "jsonl", "parquet", "hf"))
    _check(cfg.data.shard_tokens > 0, f"data.shard_tokens must be > 0, got {cfg.data.shard_tokens}")
    _check(cfg.data.prepare_workers >= 0, f"data.prepare_workers must be >= 0, got {cfg.data.prepare_workers}")
    _one_of("parallel.strategy", p.strategy, STRATEGY_NAMES)
    _one_of("parallel.dense", p.dense, ("fsdp2", "ddp"))
    _one_of("parallel.fsdp_reshard_after_forward", p.fsdp_reshard_after_forward, ("default", "always", "never"))
    _one_of("parallel.ep_placement", p.ep_placement, ("contiguous", "balanced"))
    _check(p.ep_placement == "contiguous" or e.router_skew > 0 or bool(e.routing_trace),
           "parallel.ep_placement=balanced needs a known mean load: set moe.router_skew or moe.routing_trace")
    _one_of("parallel.fssdp.sprs_post", p.fssdp.sprs_post, ("auto", "backward", "after"))
    _check(p.fssdp.link_GBps >= 0 or p.fssdp.link_GBps == -1,
           f"parallel.fssdp.link_GBps={p.fssdp.link_GBps}; allowed: > 0, 0 (device default) or -1 (measure)")
    _check(p.fssdp.expert_TFLOPs >= 0 or p.fssdp.expert_TFLOPs == -1,
           f"parallel.fssdp.expert_TFLOPs={p.fssdp.expert_TFLOPs}; allowed: > 0, 0 (device default) or -1 (measure)")
    _check(p.fssdp.replan_every >= 1, f"parallel.fssdp.replan_every must be >= 1, got {p.fssdp.replan_every}")
    _check(not p.fssdp.reshard_early or (p.fssdp.reshard_every > 0 and p.fssdp.load_window >= 2),
           "parallel.fssdp.reshard_early=true needs parallel.fssdp.reshard_every > 0 (its horizon) and "
           f"parallel.fssdp.load_window >= 2 (a held-out step), got {p.fssdp.reshard_every} and {p.fssdp.load_window}")
    _check(cfg.launch.workers >= 1, f"launch.workers must be >= 1, got {cfg.launch.workers}")
    _one_of("launch.backend", cfg.launch.backend, ("ray", "torchrun", "inline"))
    _check(cfg.launch.max_failures >= 0, f"launch.max_failures must be >= 0, got {cfg.launch.max_failures}")
    _check(cfg.launch.timeout_s >= 1, f"launch.timeout_s must be >= 1, got {cfg.launch.timeout_s}")
    _check(cfg.launch.resource_timeout_s > 0, f"launch.resource_timeout_s must be > 0, got {cfg.launch.resource_timeout_s}")
    from sparsetrain.launcher.elastic import check_min_workers

    check_min_workers(cfg)
    if p.strategy in PEER_STRATEGIES:
        _validate_peer(cfg)
    s = cfg.sparsity
    if s.enabled:
        _check(0 < s.n <= s.m, f"sparsity: need 0 < n <= m, got {s.n}:{s.m}")
        _check_nm_recipe(s)  # method, kernel, modules, stages: as NMConfig, which the trainer builds
    world = world_size or cfg.launch.workers
    _check(not (s.enabled and s.refresh_every > 1 and "experts" in s.modules and p.strategy == "fssdp" and world > 1),
           f"sparsity.refresh_every={s.refresh_every} with parallel.strategy=fssdp: a gathered copy computes its "
           "expert's mask from later weights than the owner's cached one, so ranks would mask one expert "
           "differently; use sparsity.refresh_every=1 (or strategy ep / dp)")
    validate_world(cfg, world)


def _check_finite(section: object, prefix: str = "") -> None:
    """Every float setting is a number: NaN and inf pass every `> 0` / `>= 0` check, then silently switch a
    feature off (`aux_loss_coef=nan`) or surface later as a 'non-finite loss' that names no key."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, float):
            _check(math.isfinite(value), f"{key}={value}: must be a finite number")


def _check_nm_recipe(s: object) -> None:
    """The whole N:M recipe (modules, structure-decay stages, ...) as the trainer will build it: a config error
    here, not a failure at start-up."""
    from sparsetrain.sparsity.config import NMConfig

    try:
        NMConfig.from_config(s)
    except ValueError as e:
        msg = str(e).replace("NMConfig.", "sparsity.")
        raise ConfigError(msg if msg.startswith("sparsity.") else f"sparsity: {msg}") from None


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
        _check(e.router_skew == 0 and not e.routing_trace,
               "parallel.strategy=megatron_moe: its router does not follow routing workloads "
               "(set moe.router_skew=0 and moe.routing_trace empty; deepspeed_moe follows them)")


def validate_world(cfg: Config, world: int) -> None:
    """Checks that depend on the number of ranks."""
    p, b = cfg.parallel, cfg.data.batch_size
    _check(b % (world * cfg.train.grad_accum) == 0,
           f"data.batch_size={b} is not divisible by launch.workers={world} x train.grad_accum={cfg.train.grad_accum}")
    _check(p.strategy != "none" or world == 1,
           f"parallel.strategy=none does no gradient synchronisation; with {world} workers use dp, ep or fssdp")
    _check(p.strategy != "fssdp" or world == 1 or p.ep_size in (0, world),
           f"parallel.ep_size={p.ep_size} has no effect under parallel.strategy=fssdp (it shards experts whole over "
           "all ranks and copies hot ones); leave it 0, or use parallel.strategy=ep for expert-parallel groups")
    if p.strategy in ("ep", "fssdp", *PEER_STRATEGIES) and world > 1:
        ep = p.ep_size or world
        _check(world % ep == 0, f"parallel.ep_size={ep} does not divide the world size {world}")
        if p.strategy != "fssdp":
            _check(cfg.moe.num_experts % ep == 0,
                   f"moe.num_experts={cfg.moe.num_experts} is not divisible by the expert-parallel size {ep}")
    if p.pretend_nodes and world > 1:
        _check(world % p.pretend_nodes == 0,
               f"parallel.pretend_nodes={p.pretend_nodes} does not divide the world size {world}")
