"""Measurement helpers shared by the benchmarks (run inside each rank's process).

- `ExpertBusy`: thread CPU time of the expert GEMMs, forward AND backward (identity autograd markers around
  every `GroupedExperts.forward`, or DeepSpeed's `Experts.forward` for the deepspeed_moe peer: the backward span runs from the output's grad arriving to the input's grad
  leaving, which on CPU executes on the calling thread).
- `peak_tensor_bytes`: tensor bytes this rank holds at its peak during one step: the live tensors at the
  step's start (params, optimizer state, strategy buffers; enumerated, storages de-duplicated) plus the
  high-water of the allocations the PyTorch profiler records during the step.
- `rss_high_water_mib`: the process's VmHWM (each variant runs in fresh processes, so it is the variant's own).
- `CollectiveCounter`: per-step count and bytes of every torch.distributed collective, by kind (positional or
  keyword tensor arguments: DeepSpeed's `deepspeed.comm` passes them by keyword).
- `StepClock`: each step's wall time between barriers and this process's CPU time (all threads), per rank.
- `run_interleaved` / `rotations` / `per_run_ratios` / `percentile`: repetitions in fresh processes, variants
  interleaved, summarized by medians over repetitions and per-repetition ratios (main process).
"""
from __future__ import annotations

import gc
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist


class _Mark(torch.autograd.Function):
    """Identity; its backward calls `hook` (marks where the expert backward starts / ends)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, hook: Callable[[], None]) -> torch.Tensor:  # type: ignore[override]
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.hook()
        return g, None


class ExpertBusy:
    """Accumulates expert forward and backward thread-CPU seconds; `pop()` returns and clears them."""

    def __init__(self) -> None:
        self.fwd = self.bwd = 0.0
        self._t0: list[float] = []

    def install(self, deepspeed: bool = False) -> None:
        """Time every call of a function `GroupedExperts.bind` returns (what EP and FSSDP call, and what
        `GroupedExperts.forward` runs), and DeepSpeed's `Experts.forward` when `deepspeed`: its padded
        [ep, local experts, capacity, d] buffer, the rows DeepSpeed really computes."""
        from sparsetrain.model.experts import GroupedExperts

        bind = GroupedExperts.bind

        def timed_bind(mod, *args, **kw):
            fn = bind(mod, *args, **kw)
            return partial(self._timed(lambda _, x, counts: fn(x, counts)), None)

        GroupedExperts.bind = timed_bind
        if deepspeed:
            from sparsetrain.parallel.peers.deepspeed_moe import import_deepspeed

            import_deepspeed(torch.device("cpu"))
            from deepspeed.moe.experts import Experts

            Experts.forward = self._timed(Experts.forward)

    def _timed(self, orig: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """`orig(mod, x, ...)` with its forward thread time counted and backward markers around it."""
        busy = self

        def timed(mod, x, *rest, **kw):
            if torch.is_grad_enabled() and x.requires_grad:
                x = _Mark.apply(x, busy._end)
            c0 = time.thread_time()
            y = orig(mod, x, *rest, **kw)
            busy.fwd += time.thread_time() - c0
            if y.requires_grad:
                y = _Mark.apply(y, busy._start)
            return y

        return timed

    def _start(self) -> None:
        self._t0.append(time.thread_time())

    def _end(self) -> None:
        if self._t0:
            self.bwd += time.thread_time() - self._t0.pop()

    def pop(self) -> tuple[float, float]:
        out = (self.fwd, self.bwd)
        self.fwd = self.bwd = 0.0
        self._t0.clear()
        return out


def live_tensor_bytes() -> int:
    """Bytes of every live tensor storage reachable from Python (de-duplicated by storage)."""
    import warnings

    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objs:
        try:
            if not obj.is_meta:
                t = obj.to_local() if hasattr(obj, "to_local") else obj
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001, S112 - exotic tensor subclasses without storage
            continue
    return sum(seen.values())


def peak_tensor_bytes(step_fn: Callable[[], Any]) -> int:
    """Run `step_fn` once under the profiler: live bytes at its start + the allocation high-water during it."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    base = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    run = peak = 0
    for e in events:  # allocations positive, frees negative
        run += e.nbytes()
        peak = max(peak, run)
    return base + peak


def rss_high_water_mib() -> float:
    """VmHWM of this process in MiB (nan without procfs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# isend / irecv stay unwrapped: P2POp accepts only the original functions (our spAG posts them through
# batch_isend_irecv, which is counted with the bytes of every op it carries).
_KINDS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
          "broadcast", "barrier", "send", "recv", "batch_isend_irecv", "all_to_all",
          "reduce_scatter", "_reduce_scatter_base", "_all_gather_base", "all_gather_object",
          "all_gather_single", "reduce_scatter_single", "all_gather_coalesced")  # *_single: FSDP2's, torch 2.13


def _nbytes(args: Sequence[Any]) -> int:
    """The largest tensor argument (a list of tensors counts as their sum): the bytes the call moves."""
    best = 0
    for a in args:
        if isinstance(a, torch.Tensor):
            best = max(best, a.numel() * a.element_size())
        elif isinstance(a, (list, tuple)):
            best = max(best, sum(x.numel() * x.element_size() for x in a if isinstance(x, torch.Tensor)))
        elif isinstance(getattr(a, "tensor", None), torch.Tensor):  # P2POp
            best = max(best, a.tensor.numel() * a.tensor.element_size())
    return best


class CollectiveCounter:
    """Wraps torch.distributed's collectives: calls and bytes (largest tensor argument) per kind.

    Counts what goes through the `torch.distributed` module attributes (FSDP2, our strategies, DDP-style
    loops); a library that bound a collective by `from torch.distributed import ...` before `install()`
    would not be seen, so install it before importing the code under test."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.enabled = False

    def install(self) -> None:
        for kind in _KINDS:
            fn = getattr(dist, kind, None)
            if fn is None:
                continue

            def wrapped(*args, _fn=fn, _kind=kind, **kwargs):
                if self.enabled:
                    self.calls[_kind] += 1
                    if _kind == "batch_isend_irecv":
                        ops = args[0] if args else kwargs.get("p2p_op_list", [])
                        self.bytes[_kind] += sum(_nbytes((op,)) for op in ops)
                    else:
                        self.bytes[_kind] += _nbytes([*args, *kwargs.values()])
                return _fn(*args, **kwargs)

            setattr(dist, kind, wrapped)

    def pop(self) -> tuple[dict[str, int], dict[str, int]]:
        out = dict(self.calls), dict(self.bytes)
        self.calls.clear()
        self.bytes.clear()
        return out


class StepClock:
    """Per-step wall and CPU seconds on this rank (`with clock.step(timed): train_step()`).

    Wall: from a barrier before the step to a barrier after it, so every rank sees the slowest rank's step.
    CPU: this process's CPU time over the step (`time.process_time`: all its threads, the compute and the
    communication library's), read before the closing barrier: the work the step did on this rank, which
    other load on the machine does not inflate the way it does wall time."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    @contextmanager
    def step(self, timed: bool = True) -> Iterator[None]:
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        c1 = time.process_time()
        dist.barrier()
        if timed:
            self.wall.append(time.perf_counter() - t0)
            self.cpu.append(c1 - c0)


R = TypeVar("R")


def rotations(variants: Sequence[str], repeats: int) -> list[list[str]]:
    """Each repetition's run order: the variants rotated by one more each time (a b c, b c a, c a b, a b c, ...),
    so no variant always runs first or always after the same neighbour: slow drift of the machine's load
    spreads over every variant."""
    n = len(variants)
    return [[*variants[r % n:], *variants[:r % n]] for r in range(repeats)] if n else []


def run_interleaved(variants: Sequence[str], repeats: int, run: Callable[[str], R],
                    log: Callable[[int, str, R], None] | None = None) -> dict[str, list[R]]:
    """`run(variant)` `repeats` times for each variant in the `rotations` order (each call should start fresh
    processes); returns every variant's results in repetition order. `log(rep, variant, result)` after each."""
    out: dict[str, list[R]] = {v: [] for v in variants}
    for rep, order in enumerate(rotations(variants, repeats)):
        for v in order:
            res = run(v)
            out[v].append(res)
            if log is not None:
                log(rep, v, res)
    return out


def per_run_ratios(values: Sequence[float], ref: Sequence[float]) -> list[float]:
    """Each repetition's value over the reference variant's in the same repetition (paired: they ran adjacent)."""
    if len(values) != len(ref):
        raise ValueError(f"per_run_ratios: {len(values)} values vs {len(ref)} reference values")
    return [v / r if r else float("nan") for v, r in zip(values, ref)]


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (0 <= q <= 1) of `values`; nan when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]
