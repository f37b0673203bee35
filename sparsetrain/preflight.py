"""Checks run before any process or Ray starts, beyond the config schema: counters, planner, data, memory.

`check_counters` runs inside `config.validate` (cheap, no imports). `preflight(cfg)`
runs in the CLI before a local run is launched: the planner registry, the data
on disk (exists, non-empty, dtype, long enough for model.seq_len, token ids below
model.vocab_size: the same checks the ranks would run, done once up front), and
the memory `sparsetrain plan` counts per rank (parallel.memory_plan) against what this machine has.
Every failure is a one-line ConfigError / DataError naming the key.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

from sparsetrain.config import Config, ConfigError

# counters and sizes that are silently wrong (or crash inside a rank) below their minimum: (key, min, note)
COUNTERS = (("model.vocab_size", 1, ""), ("model.d_ffn_dense", 0, "0 = 4 x d_model"), ("data.eval_batches", 1, ""),
            ("train.max_skipped_steps", 0, ""), ("checkpoint.every", 0, "0 = final save only"),
            ("checkpoint.keep", 0, "0 = keep all"), ("launch.cpus_per_worker", 1, ""), ("launch.gpus_per_worker", 0, ""),
            ("launch.torch_threads", 1, ""), ("parallel.ep_size", 0, "0 = world"), ("parallel.pretend_nodes", 0, ""),
            ("parallel.fssdp.slots_per_rank", 0, ""), ("parallel.fssdp.overlap_budget", -1, "-1 = measure"),
            ("parallel.fssdp.load_window", 1, ""), ("parallel.fssdp.reshard_every", 0, "0 = never"),
            ("offload.every_k_layers", 1, ""), ("offload.min_tensor_bytes", 0, ""), ("sparsity.refresh_every", 1, ""))


def check_counters(cfg: Config) -> None:
    """Every COUNTERS key at or above its minimum."""
    for key, low, note in COUNTERS:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value < low:
            raise ConfigError(f"{key} must be >= {low}{f' ({note})' if note else ''}, got {value}")


def check_planner(cfg: Config) -> None:
    """parallel.fssdp.planner names a registered planner."""
    from sparsetrain.parallel.planners import PLANNERS

    name = cfg.parallel.fssdp.planner
    if name not in PLANNERS:
        raise ConfigError(f"parallel.fssdp.planner={name!r}; allowed: {', '.join(sorted(PLANNERS))}")


def check_moe_layers(cfg: Config) -> None:
    """An expert strategy on several ranks needs an MoE layer to place (a dense model builds and plans; dp trains
    it)."""
    m, p = cfg.model, cfg.parallel
    if m.moe_every > m.n_layers and p.strategy not in ("none", "dp") and cfg.launch.workers > 1:
        raise ConfigError(f"model.moe_every={m.moe_every} leaves no MoE layer among model.n_layers={m.n_layers}, "
                          f"so parallel.strategy={p.strategy} has no experts to place; use parallel.strategy=dp "
                          "for a dense model")


def check_sparsity(cfg: Config) -> None:
    """sparsity.modules selects some weight of the model (built on meta, sparsified as the trainer does)."""
    if not cfg.sparsity.enabled:
        return
    from sparsetrain.model.gpt import build_model
    from sparsetrain.sparsity import apply_sparsity

    try:
        apply_sparsity(build_model(cfg, "meta"), cfg.sparsity)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except (TypeError, RuntimeError, NotImplementedError) as e:  # one line, not a traceback from inside torch
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"sparsity: cannot sparsify this model ({type(e).__name__}: {first[:300]})") from None


def check_data(cfg: Config) -> None:
    """Open data.corpus as every rank will: shards, dtype, lengths, tokenizer vs vocab (raises DataError)."""
    from sparsetrain.data.check import check_data as open_as_a_rank

    open_as_a_rank(cfg)


def visible_gpus() -> int:
    """CUDA GPUs this machine shows, from NVML (no CUDA context in the launcher), else torch's count."""
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    import torch

    return torch.cuda.device_count()


def check_device(cfg: Config) -> None:
    """train.device=cuda needs a CUDA GPU on this machine (else every rank would start, then fail)."""
    if cfg.train.device == "cuda" and visible_gpus() == 0:
        raise ConfigError("train.device=cuda but this machine has no CUDA GPU; use train.device=cpu (or auto), "
                          "or launch.address=... to run on a GPU cluster")
    launch = cfg.launch
    inline = launch.workers == 1 and not launch.address and launch.backend != "torchrun"  # runs in this process
    if inline and launch.gpus_per_worker > 0 and (have := visible_gpus()) < launch.gpus_per_worker:
        raise ConfigError(f"launch.gpus_per_worker={launch.gpus_per_worker} but this machine has {have} CUDA GPU(s); "
                          "set launch.gpus_per_worker=0 for CPU, or launch.address=... to run on a GPU cluster")


def check_sparsity_kernel(cfg: Config) -> None:
    """sparsity.kernel=triton / cuda_2_4 can run on this machine's device (else every rank would start, then fail at
    its first sparse GEMM)."""
    s, dev = cfg.sparsity, cfg.train.device
    if not s.enabled or s.kernel not in ("triton", "cuda_2_4"):
        return
    gpu = dev == "cuda" or (dev == "auto" and visible_gpus() > 0)
    where = f"train.device={dev}" + (", no CUDA GPU on this machine" if dev == "auto" else "")
    if s.kernel == "cuda_2_4":
        if not gpu:
            raise ConfigError(f"sparsity.kernel=cuda_2_4 needs train.device=cuda ({where}); use sparsity.kernel=auto "
                              "or reference on CPU")
        from sparsetrain.sparsity.config import NMConfig

        stages = [f"{n}:{m}" for n, m in NMConfig.from_config(s).stages()]
        if any(st != "2:4" for st in stages):
            raise ConfigError(f"sparsity.kernel=cuda_2_4 runs 2:4 only, got N:M stages {', '.join(stages)}; use "
                              "sparsity.kernel=triton or auto")
        return
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise ConfigError("sparsity.kernel=triton but triton is not installed (pip install 'sparsetrain[triton]')")
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"sparsity.kernel=triton needs a CUDA device or TRITON_INTERPRET=1 ({where})")


def available_bytes(device: str) -> tuple[int, str] | None:
    """(bytes one machine offers, what they are) for the run's device; None when unknown."""
    if device != "cpu":  # NVML, not torch.cuda: the launcher must not create a CUDA context on GPU 0
        with contextlib.suppress(Exception):  # no NVML / no driver: a CPU machine
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
                return int(total), "per GPU (total memory of GPU 0)"
        if device == "cuda":
            return None
    try:
        for line in open("/proc/meminfo"):  # noqa: SIM115 - tiny read
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "host memory available now"
    except OSError:
        pass
    return None


def check_memory(cfg: Config, training: bool = True) -> None:
    """Refuse a local run whose memory by `sparsetrain plan` (parallel.memory_plan) cannot fit on this machine."""
    from sparsetrain.parallel.memory_plan import memory_plan

    have = available_bytes(cfg.train.device)
    if have is None:
        return
    limit, what = have
    plan = memory_plan(cfg, cfg.launch.workers, "cuda" if "GPU" in what else "cpu")
    keys = (("params", "grads", "optimizer", "activations", "gathered_experts", "host_data") if training
            else ("params", "activations", "host_data"))
    worst = max(plan.ranks, key=lambda r: r.peak)
    need = worst.peak if training else sum(getattr(worst, k) for k in keys)
    ranks_sharing = 1 if "GPU" in what else plan.world  # a CPU run's ranks share this machine's memory
    if need * ranks_sharing > limit:
        gib = 2**30
        parts = ", ".join(f"{k} {getattr(worst, k) / gib:.2f}" for k in keys)
        raise ConfigError(f"does not fit: the plan needs {need / gib:.2f} GiB per rank ({parts} GiB) x "
                          f"{ranks_sharing} rank(s) here, but this machine has {limit / gib:.2f} GiB {what}; "
                          f"shrink model.* / data.batch_size or add workers (see `sparsetrain plan`)")


def check_fault_plan() -> None:
    """A fault-injection plan in the environment (SPARSETRAIN_FAULTS, for reliability tests) parses: a typo there
    is one line before start, not a traceback in every rank."""
    from sparsetrain.train.faults import FAULTS_ENV, parse_plan

    try:
        parse_plan(os.environ.get(FAULTS_ENV, ""))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def preflight(cfg: Config, training: bool = True, data: bool = True) -> None:
    """All pre-start checks for a run on this machine (remote clusters: counters and planner only)."""
    check_planner(cfg)
    check_moe_layers(cfg)
    check_sparsity(cfg)
    check_fault_plan()
    if cfg.launch.address:
        return  # data and memory live on the cluster's nodes; the ranks check them there
    check_device(cfg)
    check_sparsity_kernel(cfg)
    check_memory(cfg, training)
    if data:
        check_data(cfg)
