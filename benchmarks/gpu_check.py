"""`make gpu-check`: one-GPU validation in under 10 minutes, written as one Markdown table.

Rows: the device; training steps of dp, ep and fssdp with an NCCL process group up (world 1: one GPU cannot
hold two NCCL ranks), so every collective the trainer issues (loss and grad-norm all-reduces, count
reductions, logged-step byte/timer/peak-memory gathers) runs on NCCL with CUDA tensors, with step time,
tokens/s, MFU and peak memory next to `sparsetrain plan`, and Megatron-Core's MoELayer
(`parallel.strategy=megatron_moe`, alltoall dispatcher) trained the same way on the same model and data
when megatron-core is installed; the CUDA-only tests (`tests/gpu`: 2:4
semi-structured, grouped_mm, spAG/spRS on the side stream over NCCL, pinned offload, Megatron-Core equal to
sparsetrain on the same weights); `benchmarks/nm_gemm.py`
and `benchmarks/offload.py` at their GPU sizes. Each check runs in its own process with a time limit.
Without CUDA every row says so and is skipped; `--cpu-flow` runs the same flow on CPU (gloo, tiny sizes) to
check the script itself.

    python benchmarks/gpu_check.py --out runs/gpu-check          # writes runs/gpu-check/REPORT.md
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 570.0  # the whole check stays under 10 minutes: each step's limit is cut to what is left
_DEADLINE = [float("inf")]
# strategy[:precision]. megatron_moe is the peer (CUDA and megatron-core only): its layer runs fp32 under the
# trainer's bf16 autocast (see MegatronMoEBlock.forward), so it is also timed beside ep with both in fp32
STRATEGIES = ("dp", "ep", "fssdp", "megatron_moe", "ep:fp32", "megatron_moe:fp32")
# GPU-sized training check: 0.84B parameters (16 experts of d_ffn 2048 in 8 layers; 0.13B active), bf16, 30 steps
GPU_MODEL = ["model.d_model=1024", "model.n_heads=16", "model.n_layers=8", "model.seq_len=1024",
             "moe.num_experts=16", "moe.d_ffn=2048", "data.batch_size=16", "train.precision=bf16", "train.steps=30"]
CPU_MODEL = ["model.d_model=32", "model.n_heads=4", "model.n_layers=2", "model.seq_len=32", "moe.num_experts=4",
             "moe.d_ffn=32", "data.batch_size=4", "train.steps=2"]


def train_one(variant: str, device: str, out: Path) -> dict:
    """Run the trainer in this process with a world-1 process group (NCCL on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    from sparsetrain.config import load_config
    from sparsetrain.parallel.memory_plan import memory_plan
    from sparsetrain.parallel.mesh import DistInfo
    from sparsetrain.train.trainer import Trainer

    strategy, _, precision = variant.partition(":")
    tag = variant.replace(":", "_")
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    store = dist.FileStore(str(out / f"store-{tag}"), 1)
    kw = {"device_id": dev} if dev.type == "cuda" else {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=0, world_size=1, **kw)
    try:
        over = ["launch.workers=1", f"parallel.strategy={strategy}", f"train.device={device}", "train.log_every=5",
                "train.eval_every=0", "train.progress=false", f"train.out_dir={out / tag}",
                "checkpoint.save_final=false", "checkpoint.resume=false", "checkpoint.every=0"]
        model = GPU_MODEL if dev.type == "cuda" else CPU_MODEL
        cfg = load_config("tiny", over + model + ([f"train.precision={precision}"] if precision else []))
        summary = Trainer(cfg, DistInfo(device=dev)).fit()
        summary["plan_mib"] = memory_plan(cfg, world=1, device=device).max_mib
        summary["backend"] = dist.get_backend()
        return summary
    finally:
        dist.destroy_process_group()


def _run(cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> tuple[str, float, str]:
    """(status, seconds, output) of a subprocess with a time limit (never past the whole check's budget)."""
    t0 = time.perf_counter()
    timeout = int(max(5.0, min(timeout, _DEADLINE[0] - t0)))
    try:
        p = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "SPARSETRAIN_PROGRESS": "0", **(env or {})})
        status = "pass" if p.returncode == 0 else f"FAIL (exit {p.returncode})"
        return status, time.perf_counter() - t0, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return f"FAIL (over {timeout} s)", time.perf_counter() - t0, out


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _device_row(cuda: bool) -> tuple[str, str, float, str]:
    import torch

    if not cuda:
        return ("device", "skipped", 0.0, f"no CUDA device (torch {torch.__version__}, CPU only)")
    name = torch.cuda.get_device_name(0)
    nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
    return ("device", "pass", 0.0, f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}")


def _train_row(strategy: str, device: str, out: Path, timeout: int) -> tuple[tuple[str, str, float, str], str]:
    res = out / f"train-{strategy.replace(':', '_')}.json"
    status, secs, text = _run([sys.executable, __file__, "--train-one", strategy, "--device", device,
                               "--out", str(out), "--result", str(res)], timeout)
    if status == "pass" and res.exists():
        s = json.loads(res.read_text())
        mfu = f", MFU {100 * s['mfu']:.1f}%" if "mfu" in s else ""
        peak = s["peak_memory_mib"][0]
        detail = (f"{s['backend']}, {s['strategy']}: {s['step_ms']:.0f} ms/step, {s['tokens_per_s']:,.0f} tok/s, "
                  f"{s['tflops_per_rank']:.2f} TFLOP/s{mfu}; peak {peak:,.0f} MiB vs plan {s['plan_mib']:,.0f} MiB "
                  f"({peak / s['plan_mib']:.2f}x); loss {s['final_loss']:.3f}")
    else:
        detail = _tail(text, 3).replace("\n", " / ")
    return (f"train {strategy} (world 1)", status, secs, detail), text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu-check")
    ap.add_argument("--cpu-flow", action="store_true", help="without CUDA: run the flow on CPU at tiny sizes")
    ap.add_argument("--only", default="", help="comma-separated subset: device,train,tests,nm_gemm,offload")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check on CUDA")
    ap.add_argument("--train-one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.train_one:
        Path(a.result).write_text(json.dumps(train_one(a.train_one, a.device, out), default=str))
        return
    import torch

    cuda = torch.cuda.is_available()
    run_here = cuda or a.cpu_flow
    device = "cuda" if cuda else "cpu"
    only = set(a.only.split(",")) if a.only else {"device", "train", "tests", "nm_gemm", "offload"}
    rows: list[tuple[str, str, float, str]] = []
    logs: list[tuple[str, str]] = []
    t_start = time.perf_counter()
    if cuda:
        _DEADLINE[0] = t_start + a.budget
    if "device" in only:
        rows.append(_device_row(cuda))
    skip = "skipped: no CUDA device (run on a GPU machine, or --cpu-flow to check the flow on CPU)"
    if "train" in only:
        for s in STRATEGIES:
            if not run_here:
                rows.append((f"train {s} (world 1)", skip, 0.0, ""))
                continue
            if s.startswith("megatron_moe") and not (cuda and importlib.util.find_spec("megatron")):
                why = "no CUDA device" if not cuda else "megatron-core not installed (extra .[megatron])"
                rows.append((f"train {s} (world 1)", f"skipped: {why}", 0.0, ""))
                continue
            row, text = _train_row(s, device, out, 150 if cuda else 600)
            rows.append(row)
            logs.append((row[0], _tail(text)))
    if "tests" in only:
        if run_here:
            status, secs, text = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"],
                                      240 if cuda else 600)
            rows.append(("tests/gpu (2:4, grouped_mm, side streams, pinned offload, Megatron-Core)", status, secs,
                         _tail(text, 1)))
            logs.append(("tests/gpu", _tail(text)))
        else:
            rows.append(("tests/gpu", skip, 0.0, ""))
    benches = {
        "nm_gemm": ["benchmarks/nm_gemm.py"] + ([] if cuda else ["--sizes", "64", "--expert", "64x128",
                                                                 "--expert-tokens", "64", "--min-time", "0.01"]),
        "offload": ["benchmarks/offload.py", "--steps", "3"] + (
            ["--d-model", "1024", "--layers", "8", "--heads", "16", "--seq", "1024", "--batch", "8"] if cuda else
            ["--d-model", "32", "--layers", "2", "--seq", "32", "--batch", "2", "--min-bytes", "1024"]),
    }
    for name, cmd in benches.items():
        if name not in only:
            continue
        if not run_here:
            rows.append((f"benchmarks/{name}.py", skip, 0.0, ""))
            continue
        status, secs, text = _run([sys.executable, *cmd], 180 if cuda else 600)
        rows.append((f"benchmarks/{name}.py ({'GPU' if cuda else 'CPU flow'} sizes)", status, secs,
                     "table below" if status == "pass" else _tail(text, 2).replace("\n", " / ")))
        logs.append((f"benchmarks/{name}.py", _tail(text, 30)))
    report = _report(rows, logs, time.perf_counter() - t_start, cuda)
    (out / "REPORT.md").write_text(report)
    (out / "rows.json").write_text(json.dumps([dict(zip(("check", "result", "seconds", "numbers"), r))
                                               for r in rows], indent=1))
    print(report)
    print(f"wrote {out / 'REPORT.md'}")
    if any(r[1].startswith("FAIL") for r in rows):
        sys.exit(1)


def _report(rows: list[tuple[str, str, float, str]], logs: list[tuple[str, str]], total_s: float,
            cuda: bool) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GPU check ({when}, {total_s:.0f} s{'' if cuda else ', no CUDA'})", "",
             "| check | result | seconds | numbers |", "|---|---|---|---|"]
    lines += [f"| {name} | {status} | {secs:.0f} | {detail} |" for name, status, secs, detail in rows]
    for name, text in logs:
        lines += ["", f"## {name}", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
