"""N:M linear ops and the dispatcher that picks a path from eligibility plus a benchmark table.

Table (written by benchmarks/nm_gemm.py --out): {"entries": {key: {"dense_ms": t, "paths": {name: t}}}}
with key = "<device name>|<dtype>|<n>:<m>|<tokens>x<out>x<in>" (each size rounded up to a power of 2).
A path is only chosen from the table if its measured fwd+bwd time beat dense; otherwise the
reference (masked dense matmul, i.e. dense speed) runs. On CUDA a shape bucket missing from the table is
measured once in this process (`measure_entry`) and cached.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from sparsetrain.kernels.grouped import grouped_linear
from sparsetrain.kernels.nm_format import NMCompressed
from sparsetrain.kernels.nm_paths import NM_PATHS, NMWeight, dense_of, get_path


def measured_entries() -> dict[str, dict]:
    """Entries measured by the dispatcher in this process (table layout; benchmarks can save them)."""
    return dict(_measured)

log = logging.getLogger("sparsetrain.kernels.nm")

TABLE_ENV = "SPARSETRAIN_NM_TABLE"
AUTOTUNE_ENV = "SPARSETRAIN_NM_AUTOTUNE"  # "0": never measure (CUDA without a table entry then uses the rule below)
# Without a table on CUDA, 2:4 is used only at sizes where published fwd+bwd gains are > 1 (1.1-1.3x).
CUDA24_MIN_DIM = 2048

_table: dict | None = None
_table_loaded = False
_logged: set[tuple] = set()
_measured: dict[str, dict] = {}  # key -> entry measured in this process (same layout as table entries)


def set_benchmark_table(table: dict | str | Path | None) -> None:
    """Use this benchmark table (dict or JSON path); None disables it."""
    global _table, _table_loaded
    if isinstance(table, (str, Path)):
        table = json.loads(Path(table).read_text())
    if table is not None and not isinstance(table.get("entries"), dict):
        raise ValueError("benchmark table needs an 'entries' mapping (as written by benchmarks/nm_gemm.py --out)")
    _table, _table_loaded = table, True
    _logged.clear()
    _measured.clear()


def benchmark_table() -> dict | None:
    """The active table; loaded once from $SPARSETRAIN_NM_TABLE when set."""
    global _table_loaded
    if not _table_loaded:
        path = os.environ.get(TABLE_ENV)
        if path:
            set_benchmark_table(path)
        _table_loaded = True
    return _table


def device_name(device: torch.device) -> str:
    """Name used in table keys: the CUDA device name, or 'cpu'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _p2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def table_key(device: torch.device, dtype: torch.dtype, n: int, m: int, tokens: int, out_f: int, in_f: int) -> str:
    """Benchmark-table key for a device, dtype, N:M pattern and shape bucket."""
    dt = str(dtype).replace("torch.", "")
    return f"{device_name(device)}|{dt}|{n}:{m}|{_p2(tokens)}x{_p2(out_f)}x{_p2(in_f)}"


def _nm(w: NMWeight, n: int | None, m: int | None) -> tuple[int, int]:
    if isinstance(w, NMCompressed):
        return w.n, w.m
    if n is None or m is None:
        raise ValueError("n and m are required when the weight is a dense masked tensor")
    return n, m


def _time_ms(fn, x: torch.Tensor, w: torch.Tensor, iters: int = 10) -> float:
    """Mean fwd+bwd milliseconds of fn(x, w) (CUDA events after 3 warm-up calls)."""
    xs, ws = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    for _ in range(3):
        fn(xs, ws).sum().backward()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(x.device)
    start.record()
    for _ in range(iters):
        fn(xs, ws).sum().backward()
    end.record()
    torch.cuda.synchronize(x.device)
    return start.elapsed_time(end) / iters


def measure_entry(x: torch.Tensor, w: torch.Tensor, n: int, m: int, paths: list[str]) -> dict:
    """Time dense and each of `paths` (prepared once, as in training) fwd+bwd on this shape: a table entry."""
    w = w if not isinstance(w, NMCompressed) else dense_of(w)
    x = torch.randn(x.shape, device=x.device, dtype=x.dtype)  # the caller's x may be part of a graph
    entry = {"dense_ms": _time_ms(lambda a, b: torch.nn.functional.linear(a, b), x, w), "paths": {},
             "measured_here": True}
    for name in paths:
        p = NM_PATHS[name]
        try:
            prep = p.prepare(w, n, m)
            entry["paths"][name] = _time_ms(lambda a, b, p=p, prep=prep: p.run_prepared(a, prep, b), x, w)
        except Exception as e:  # noqa: BLE001 - a path that fails here is never chosen
            log.info("nm autotune: %s failed on %s: %s", name, tuple(w.shape), str(e).splitlines()[0])
            entry["paths"][name] = None
    return entry


def choose_path(x: torch.Tensor, w: NMWeight, n: int, m: int) -> tuple[str, str]:
    """Pick (path name, reason) for a 2-D input x and weight w: a table entry, else (CUDA) one measured here
    once per shape bucket and cached, else a rule."""
    out_f, in_f = tuple(w.shape)[-2:]
    eligible = {name: p.eligible(x, w, n, m) for name, p in NM_PATHS.items() if name != "reference"}
    ok = [name for name, (good, _) in eligible.items() if good]
    table = benchmark_table()
    key = table_key(x.device, x.dtype, n, m, x.shape[0], out_f, in_f)
    entry = table["entries"].get(key) if table else None
    if entry is None and x.is_cuda and ok and os.environ.get(AUTOTUNE_ENV, "1") != "0":
        if key not in _measured:
            _measured[key] = measure_entry(x, w, n, m, ok)
        entry = _measured[key]
    if entry is not None:
        dense = float(entry["dense_ms"])
        timed = {p: float(t) for p, t in entry.get("paths", {}).items() if p in ok and t is not None}
        faster = {p: t for p, t in timed.items() if t < dense}
        if faster:
            best = min(faster, key=faster.get)
            return best, f"table {key}: {best} {dense / faster[best]:.2f}x dense"
        why = ", ".join(f"{p} {dense / t:.2f}x" for p, t in timed.items()) or "no eligible path timed"
        return "reference", f"table {key}: nothing faster than dense ({why})"
    if x.is_cuda and "cuda_2_4" in ok and min(x.shape[0], out_f, in_f) >= CUDA24_MIN_DIM:
        return "cuda_2_4", f"no table entry {key}; 2:4 eligible and all dims >= {CUDA24_MIN_DIM}"
    skipped = "; ".join(f"{p}: {r}" for p, (good, r) in eligible.items() if not good)
    return "reference", f"no table entry {key}; default reference" + (f" ({skipped})" if skipped else "")


def _resolve(x: torch.Tensor, w: NMWeight, n: int, m: int, path: str | None) -> str:
    if path is not None and path != "auto":
        good, reason = get_path(path).eligible(x, w, n, m)
        if not good:
            raise ValueError(f"N:M path {path!r} is not usable here: {reason}")
        return path
    name, reason = choose_path(x, w, n, m)
    tag = (name, reason)
    if tag not in _logged:
        _logged.add(tag)
        log.info("nm_linear: path=%s (%s)", name, reason)
    return name


def nm_linear(x: torch.Tensor, weight: NMWeight, bias: torch.Tensor | None = None, *,
              n: int | None = None, m: int | None = None, path: str | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for an N:M weight (compressed or dense masked); path None/'auto' dispatches."""
    n, m = _nm(weight, n, m)
    x2 = x.reshape(-1, x.shape[-1])  # [..., in] -> [B, in]
    name = _resolve(x2, weight, n, m, path)
    y = NM_PATHS[name].run(x2, weight, bias, n, m)
    return y.reshape(*x.shape[:-1], y.shape[-1])  # [B, out] -> [..., out]


def grouped_nm_linear_reference(x: torch.Tensor, weight: NMWeight, counts: list[int]) -> torch.Tensor:
    """Per-expert masked dense matmuls; weight [E, out, in] dense masked or compressed."""
    return grouped_linear(x, dense_of(weight), counts)


def grouped_nm_linear(x: torch.Tensor, weight: NMWeight, counts: list[int], *, n: int | None = None,
                      m: int | None = None, path: str | None = None) -> torch.Tensor:
    """Grouped expert GEMM with N:M weights [E, out, in]; x [N, in] sorted by expert."""
    n, m = _nm(weight, n, m)
    if len(weight.shape) != 3 or len(counts) != weight.shape[0]:
        raise ValueError(f"weight shape {tuple(weight.shape)} must be [E, out, in] with E = len(counts)={len(counts)}")
    avg = max(1, sum(counts) // max(1, len(counts)))
    probe = x[:avg] if x.shape[0] >= avg else x.new_zeros(avg, x.shape[-1])  # shape/device probe for dispatch
    w0 = weight[0]
    name = _resolve(probe, w0, n, m, path)
    if name == "reference":
        return grouped_nm_linear_reference(x, weight, counts)
    run = NM_PATHS[name].run
    outs = [run(xe.contiguous(), weight[e], None, n, m) for e, xe in enumerate(torch.split(x, counts, dim=0))]
    return torch.cat(outs, dim=0) if outs else x.new_zeros(0, weight.shape[1])  # [N, out]
