"""N:M GEMM benchmark: each eligible path vs dense, fwd+bwd, measured side by side in one run.

CPU: reference (masked dense from the compressed form) vs dense, plus compressed vs dense bytes.
CUDA: cuda_2_4 (semi-structured) and triton (compressed N:M) vs dense at 1024..8192 and expert shapes.
`--out table.json` writes the table the dispatcher reads (set SPARSETRAIN_NM_TABLE to it).
Paths run as training runs them: the weight is prepared once (compressed / semi-structured), then
fwd+bwd calls `run_prepared` with the gradient flowing into the dense masked weight.
`--train-step` adds an N:M training step-time ratio: gpt-moe-s-sized layers (`--train-layers` of them),
bf16 autocast on CUDA, 2:4 SR-STE on experts+mlp+attn with `sparsity.kernel=auto` vs the dense masked
GEMM (`reference`) vs no sparsity.

    python benchmarks/nm_gemm.py --sizes 256 512 1024 --out nm_table.json
    python benchmarks/nm_gemm.py --train-step --train-layers 2 --seq 1024 --batch 8   # GPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sparsetrain.kernels import NM_PATHS, compress_nm, table_key
from sparsetrain.kernels.nm_dispatch import device_name

from sparsetrain.sparsity import nm_mask


def bench_ms(fns: dict[str, Callable[[], None]], device: torch.device, min_time: float = 0.3,
             warmup: int = 3) -> dict[str, float]:
    """Median wall time (ms) of each fn, timed in interleaved rounds so all see the same machine load."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    rounds = max(5, min(100, int(min_time / once)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def fwd_bwd(x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """Closure running forward and backward (grads for x and the weight)."""
    def step() -> None:
        x.grad = None
        run(x).sum().backward()

    return step


def shapes(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(label, tokens, out, in): squares plus expert SwiGLU shapes (w1/w3 and w2)."""
    out = [(f"square {s}", s, s, s) for s in args.sizes]
    for d, f in args.expert:
        out.append((f"expert w1 {d}->{f}", args.expert_tokens, f, d))
        out.append((f"expert w2 {f}->{d}", args.expert_tokens, d, f))
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, m = args.n, args.m
    rows, entries, notes = [], {}, []
    for label, t, o, i in shapes(args):
        torch.manual_seed(0)
        x = torch.randn(t, i, device=device, dtype=dtype, requires_grad=True)
        w_dense = torch.randn(o, i, device=device, dtype=dtype)
        w_masked = (w_dense * nm_mask(w_dense, n, m)).requires_grad_(True)
        w_dense.requires_grad_(True)
        c = compress_nm(w_masked.detach(), n, m)
        fns = {"dense": fwd_bwd(x, lambda a, wd=w_dense: F.linear(a, wd))}
        times: dict[str, float | None] = {}
        for name, path in NM_PATHS.items():
            ok, why = path.eligible(x, w_masked, n, m)
            times[name] = None
            if ok:
                prep = path.prepare(w_masked, n, m)  # once per optimizer step in training
                fns[name] = fwd_bwd(x, lambda a, p=path, pr=prep, wm=w_masked: p.run_prepared(a, pr, wm))
            else:
                notes.append(f"{name}: {why}")
        measured = bench_ms(fns, device, args.min_time)
        dense_ms = measured.pop("dense")
        times.update(measured)
        key = table_key(device, dtype, n, m, t, o, i)
        entries[key] = {"dense_ms": dense_ms, "paths": times, "label": label}
        bytes_ratio = c.nbytes / c.dense_nbytes
        rows.append((label, t, o, i, dense_ms, times, bytes_ratio))
    return {"rows": rows, "entries": entries, "device": device_name(device), "dtype": args.dtype, "n": n, "m": m,
            "notes": sorted(set(notes))}


def print_table(res: dict) -> None:
    """Markdown table: ms per fwd+bwd and speedup vs dense (>1 = faster), bytes ratio."""
    paths = list(NM_PATHS)
    head = ["shape", "tokens x out x in", "dense ms"] + [f"{p} ms (x dense)" for p in paths] + ["bytes vs dense"]
    print(f"device: {res['device']}  dtype: {res['dtype']}  pattern: {res['n']}:{res['m']}  (fwd+bwd, median)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, t, o, i, dense, times, br in res["rows"]:
        cells = [label, f"{t}x{o}x{i}", f"{dense:.3f}"]
        for p in paths:
            v = times.get(p)
            cells.append("n/a" if v is None else f"{v:.3f} ({dense / v:.2f}x{'' if v < dense else ', slower'})")
        cells.append(f"{100 * br:.1f}%")
        print("| " + " | ".join(cells) + " |")
    for note in res["notes"]:
        print(f"not run: {note}")


def train_step_ratio(args: argparse.Namespace) -> None:
    """Median optimizer-step time of N:M kernels (auto) vs the dense masked GEMM vs no sparsity."""
    from sparsetrain.config import load_config
    from sparsetrain.model.gpt import build_model
    from sparsetrain.sparsity import NMConfig, nm_sparsifier, sparsify_

    device = torch.device(args.device)
    over = [f"model.n_layers={args.train_layers}", f"model.seq_len={args.seq}", "model.vocab_size=1024"]
    cfg = load_config("gpt-moe-s", over)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    x = torch.randint(0, 1024, (args.batch, args.seq), device=device)
    fns, sps = {}, {}
    for name in ("dense", "nm reference", "nm auto"):
        model = build_model(cfg, device)
        if name != "dense":
            sparsify_(model, NMConfig(modules=["experts", "mlp", "attn"], kernel=name.split()[1]))
            sps[name] = nm_sparsifier(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sp_now = sps.get(name)

        def step(model=model, opt=opt, sp=sp_now) -> None:
            with amp:
                out = model(x, x)
            (out.loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sp is not None:
                sp.step(sp.state.step + 1)

        fns[name] = step
    ms = bench_ms(fns, device, args.min_time)
    print(f"N:M training step ({device}, gpt-moe-s layers x{args.train_layers}, seq {args.seq}, batch {args.batch})")
    print("| variant | step ms | x dense | kernels used |")
    print("|---|---|---|---|")
    for name, v in ms.items():
        sp = sps.get(name)
        used = dict(sp.compute.calls) if sp is not None and sp.compute is not None else {}
        print(f"| {name} | {v:.2f} | {ms['dense'] / v:.2f} | {used} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", default="float16" if cuda else "float32")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192] if cuda else [256, 512, 1024])
    ap.add_argument("--expert", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="*",
                    default=[(1024, 4096), (4096, 1536)] if cuda else [(256, 1024)],
                    help="expert d_model x d_ffn pairs")
    ap.add_argument("--expert-tokens", type=int, default=4096 if cuda else 512)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of repeats per measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = torch default)")
    ap.add_argument("--out", default="", help="write the dispatcher's JSON table here")
    ap.add_argument("--train-step", action="store_true", help="also time an N:M training step (see the docstring)")
    ap.add_argument("--train-layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024 if cuda else 64)
    ap.add_argument("--batch", type=int, default=8 if cuda else 2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_step:
        train_step_ratio(args)
    res = run(args)
    print_table(res)
    if args.out:
        table = {"version": 1, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                 "device": res["device"], "entries": res["entries"]}
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
        print(f"wrote {args.out} ({len(res['entries'])} entries)")


if __name__ == "__main__":
    main()
