"""MoE strategies side by side on realistic routing: every variant in fresh processes, same data and weights.

A workload and a variant are each a list of config overrides (`WORKLOADS`, `VARIANTS`; `--set` adds more to
every run), so adding a baseline is one dict entry. For each (world, workload) every variant runs `--repeats`
times, each run a fresh set of gloo ranks building a Trainer (same seed: same initial weights and batches),
the runs interleaved (repetition r runs the variants rotated by r: ep fssdp ds, fssdp ds ep, ...) so that a
change in machine load hits every variant alike. Per variant it reports: step time (slowest rank per step)
as the median over repetitions of each run's median, and p90 / max over every timed step of every repetition
(re-shard steps listed); the ratio to `ep` (or to the first variant when ep is not run) of those medians and
each repetition's own ratio (paired runs, adjacent in time); CPU ms per step (this rank's process CPU time,
all threads, max over ranks; median over steps and repetitions: the work, independent of machine load) and
its ratio to ep; tokens/s; expert busy (thread CPU time of the expert GEMMs, forward + backward) max/mean over
ranks and the max in ms; expert slots computed per rank max/mean; the workload's measured expert load
max/mean and top-1 share; spAG / all-to-all MiB per step (bytes each rank sends to other ranks, summed over
ranks; DeepSpeed-MoE's token all-to-all counted the same way); peak tensor bytes per rank (one profiled step
after the timed ones) and RSS high-water per rank (max over repetitions); the loss after the last step and
dropped slots (a comment flags a variant whose repetitions disagree on them). Progress goes to stderr, the
table to stdout. After each workload a comment line gives sparsetrain EP's step time over DeepSpeed-MoE
dropless's (`ep-ddp` is the like-for-like row: dense parameters replicated, as under DeepSpeed ZeRO-0), and
another what balancing the expert compute alone would give each static EP row (`balance_bound`); when
`balanced` is among the workloads, each variant's step on every other workload over its own on balanced
routing closes the world (`imbalance_penalty`).
DeepSpeed's gate follows every workload's quotas; a variant the config refuses (megatron_moe without CUDA)
prints as an n/a row with the reason.

    python benchmarks/moe_strategies.py                                # 2 ranks, every workload and variant
    python benchmarks/moe_strategies.py --worlds 2 --workloads balanced --variants ep fssdp-lpt deepspeed_moe \
        --steps 30 --warmup 6 --repeats 5                              # medians of 5 interleaved repetitions
    python benchmarks/moe_strategies.py --worlds 4 --workloads zipf1.2 --variants ep ep-balanced fssdp-lpt
    python benchmarks/moe_strategies.py --list                         # the workloads and variants
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TRACES = ROOT / "benchmarks" / "traces"

MODEL = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.seq_len=128", "moe.num_experts=16",
         "moe.top_k=2", "moe.d_ffn=2048", "data.batch_size=16", "train.eval_every=0", "train.log_every=1000",
         "train.progress=false", "checkpoint.save_final=false", "checkpoint.resume=false",
         "launch.torch_threads=1", "train.warmup_steps=2", "train.seed=1337"]
WORKLOADS = {  # name -> overrides; see sparsetrain/model/workloads.py
    "uniform": ["moe.aux_loss_coef=0.01"],  # learned routing, aux loss on (early steps are far from balanced)
    # equal shares reached by the router's per-sequence quotas (Zipf with s -> 0; router_skew=0 means "off")
    "balanced": ["moe.router_skew=1e-6", "moe.aux_loss_coef=0.01"],
    "zipf1.2": ["moe.router_skew=1.2", "moe.aux_loss_coef=0.01"],  # Zipf(1.2) over a seeded permutation
    "drift": ["moe.router_skew=1.2", "moe.skew_drift_every=10", "moe.aux_loss_coef=0.01"],  # hot set moves
    "trace-aux": [f"moe.routing_trace={TRACES / 'aux_on.jsonl'}"],  # recorded runs, replayed
    "trace-noaux": [f"moe.routing_trace={TRACES / 'aux_off.jsonl'}"],
    "trace-auxfree": [f"moe.routing_trace={TRACES / 'aux_free.jsonl'}"],
}
# the overlap budget and the copy cost gate use the device's machine numbers (parallel.fssdp.link_GBps /
# expert_TFLOPs = 0): fixed per run, so placement is deterministic; pin them with --set for another machine
FSSDP = ["parallel.strategy=fssdp", "parallel.fssdp.slots_per_rank=2", "parallel.fssdp.load_window=3",
         "parallel.fssdp.reshard_every=5"]
VARIANTS = {  # name -> overrides
    "ep": ["parallel.strategy=ep"],  # contiguous expert blocks, dense parameters FSDP2-sharded
    "ep-ddp": ["parallel.strategy=ep", "parallel.dense=ddp"],  # dense replicated: DeepSpeed ZeRO-0's handling
    "ep-ddp-serial": ["parallel.strategy=ep", "parallel.dense=ddp", "parallel.a2a_overlap=false"],  # no overlap
    "ep-balanced": ["parallel.strategy=ep", "parallel.ep_placement=balanced"],  # best static for the mean load
    # the same placement with dense parameters replicated: the strongest static EP, like-for-like with ep-ddp
    "ep-balanced-ddp": ["parallel.strategy=ep", "parallel.ep_placement=balanced", "parallel.dense=ddp"],
    "eplb": [*FSSDP, "parallel.fssdp.planner=eplb", "parallel.fssdp.replan_every=10",
             "parallel.fssdp.reshard_every=0"],  # EPLB-style: redundant hot experts, re-planned periodically
    "lpt-spill": [*FSSDP, "parallel.fssdp.planner=lpt_spill", "parallel.fssdp.reshard_every=0"],  # LLEP per step
    "fssdp-hecate": [*FSSDP, "parallel.fssdp.planner=hecate"],
    "fssdp-lpt": [*FSSDP, "parallel.fssdp.planner=lpt_spill"],
    "fssdp-eplb": [*FSSDP, "parallel.fssdp.planner=eplb"],
    "fssdp-none": [*FSSDP, "parallel.fssdp.planner=none"],  # re-sharding only, no copies
    # like-for-like with ep-ddp (the strongest EP row): dense parameters replicated as there
    "fssdp-lpt-ddp": [*FSSDP, "parallel.fssdp.planner=lpt_spill", "parallel.dense=ddp"],
    # the same, also re-sharding between scheduled steps when a one-step fit pays on the next step (opt-in)
    "fssdp-lpt-ddp-early": [*FSSDP, "parallel.fssdp.planner=lpt_spill", "parallel.dense=ddp",
                            "parallel.fssdp.reshard_early=true"],
    # peers (extras .[deepspeed] / .[megatron]); both dropless at moe.capacity_factor=0. DeepSpeed's gate follows
    # every workload's quotas (sparsetrain/parallel/peers/deepspeed_gate.py); ZeRO-0 replicates dense parameters,
    # so its like-for-like sparsetrain row is ep-ddp
    "deepspeed_moe": ["parallel.strategy=deepspeed_moe"],
    "megatron_moe": ["parallel.strategy=megatron_moe"],  # CUDA only (refused in one line elsewhere: printed n/a)
}
TOKENS_PER_STEP = 16 * 128  # data.batch_size x model.seq_len in MODEL
NEEDS_MEAN_LOAD = {"ep-balanced", "ep-balanced-ddp"}  # skipped on learned routing (no known mean load)


def _rank_body(rank: int, world: int, overrides: list[str], steps: int, warmup: int) -> dict:
    """One rank of one variant: build, run, measure; returns this rank's numbers."""
    import torch

    os.dup2(2, 1)  # this rank's own output (DeepSpeed's logs, profiler notes) goes to stderr: stdout is the table
    sys.stdout = sys.stderr

    from benchmarks.measure import ExpertBusy, StepClock, peak_tensor_bytes, rss_high_water_mib
    from sparsetrain.config import load_config
    from sparsetrain.parallel.mesh import init_distributed
    from sparsetrain.telemetry.comm import COMM
    from sparsetrain.train.trainer import Trainer

    torch.set_num_threads(1)
    busy = ExpertBusy()
    busy.install(deepspeed="parallel.strategy=deepspeed_moe" in overrides)
    cfg = load_config("tiny", MODEL + [f"launch.workers={world}", f"train.steps={steps + 1}",
                                       f"train.out_dir=/tmp/st-bench-{os.getpid()}", *overrides])
    tr = Trainer(cfg, init_distributed("cpu"))
    clock = StepClock()
    fwd_bwd, slots, comm, loads, reshard_steps = [], [], [], [], []
    loss, dropped = float("nan"), 0
    for step in range(steps):
        COMM.reset()
        busy.pop()
        before = getattr(tr.strategy, "reshards", 0)
        with clock.step(timed=step >= warmup):
            rec = tr.train_step(step)
        f, b = busy.pop()
        if getattr(tr.strategy, "reshards", 0) != before:
            reshard_steps.append(step)
        loss, dropped = rec["loss"], dropped + rec.get("dropped_slots", 0)
        if rec.get("_counts") is not None:
            loads.append(rec["_counts"])
        if step >= warmup:
            fwd_bwd.append((f, b))
            slots.append(sum(getattr(tr.strategy, "rank_tokens", {}).values()))
            comm.append(COMM.snapshot())
    peak = peak_tensor_bytes(lambda: tr.train_step(steps))  # one more step, profiled, not timed
    shutil.rmtree(cfg.train.out_dir, ignore_errors=True)  # this rank's scratch out_dir (its heartbeats)
    n = max(len(clock.wall), 1)
    return {"times": clock.wall, "cpu": clock.cpu, "busy_fwd": sum(f for f, _ in fwd_bwd) / n, "busy_bwd": sum(b for _, b in fwd_bwd) / n,
            "slots": sum(slots) / n, "loads": loads, "loss": loss, "dropped": dropped,
            "reshard_steps": reshard_steps,
            "bytes": {k: sum(c.get(k, 0) for c in comm) / n for k in ("spag", "sprs", "all_to_all", "reshard")},
            "peak_tensor_mib": peak / 2**20, "rss_mib": rss_high_water_mib()}


def _load_stats(loads: list) -> tuple[float, float]:
    """Mean over steps and layers of the global expert load max/mean and the top-1 share."""
    import torch

    if not loads:
        return float("nan"), float("nan")
    c = torch.tensor(loads, dtype=torch.float64)  # [steps, L, E]
    return float((c.max(-1).values / c.mean(-1)).mean()), float((c.max(-1).values / c.sum(-1)).mean())


def summarize(world: int, workload: str, variant: str, per_rank: list[dict], tokens_per_step: int) -> dict:
    """One run's numbers from every rank's."""
    from benchmarks.measure import percentile

    n = len(per_rank[0]["times"])
    step = [max(r["times"][i] for r in per_rank) for i in range(n)]  # the slowest rank's step
    cpu = [max(r["cpu"][i] for r in per_rank) for i in range(n)]  # the busiest rank's CPU time
    busy = [r["busy_fwd"] + r["busy_bwd"] for r in per_rank]
    slots = [r["slots"] for r in per_rank]
    load_mm, top1 = _load_stats(per_rank[0]["loads"])
    nan = float("nan")
    return {"world": world, "workload": workload, "variant": variant,
            "step_ms": 1000 * statistics.median(step) if step else nan,
            "p90_ms": 1000 * percentile(step, 0.9), "max_ms": 1000 * max(step) if step else nan,
            "cpu_ms": 1000 * statistics.median(cpu) if cpu else nan, "steps_ms": [1000 * t for t in step],
            "tok_s": tokens_per_step * len(step) / sum(step) if step else nan,
            "busy_max_mean": max(busy) / max(statistics.mean(busy), 1e-12), "busy_max_ms": 1000 * max(busy),
            "slots_max_mean": max(slots) / max(statistics.mean(slots), 1e-12) if any(slots) else nan,
            "load_max_mean": load_mm, "top1_share": top1,
            "spag_mib": sum(r["bytes"]["spag"] for r in per_rank) / 2**20,
            "reshard_mib": sum(r["bytes"]["reshard"] for r in per_rank) / 2**20,
            "a2a_mib": sum(r["bytes"]["all_to_all"] for r in per_rank) / 2**20,
            "peak_tensor_mib": max(r["peak_tensor_mib"] for r in per_rank),
            "rss_mib": max(r["rss_mib"] for r in per_rank), "loss": per_rank[0]["loss"],
            "dropped": per_rank[0]["dropped"], "reshard_steps": per_rank[0]["reshard_steps"]}


_MEDIAN_OVER_RUNS = ("step_ms", "cpu_ms", "tok_s", "busy_max_mean", "busy_max_ms", "slots_max_mean", "load_max_mean",
                     "top1_share", "spag_mib", "reshard_mib", "a2a_mib")


def combine(runs: list[dict]) -> dict:
    """A variant's row from its repetitions: medians over runs (step and CPU time: of each run's median), p90 and
    max over every timed step of every run, memory high-waters the max over runs, loss / dropped / re-shard
    steps of the first run (`same_result` says whether every run agreed on them)."""
    from benchmarks.measure import percentile

    first = runs[0]
    steps = [t for r in runs for t in r["steps_ms"]]
    out = {**first, **{k: statistics.median(r[k] for r in runs) for k in _MEDIAN_OVER_RUNS}}
    out.update(repeats=len(runs), steps_ms=steps, p90_ms=percentile(steps, 0.9),
               max_ms=max(steps) if steps else float("nan"),
               peak_tensor_mib=max(r["peak_tensor_mib"] for r in runs), rss_mib=max(r["rss_mib"] for r in runs),
               run_step_ms=[r["step_ms"] for r in runs], run_cpu_ms=[r["cpu_ms"] for r in runs],
               same_result=all((r["loss"], r["dropped"], r["reshard_steps"]) ==
                               (first["loss"], first["dropped"], first["reshard_steps"]) for r in runs))
    return out


HEADER = ("| ranks | workload | variant | step ms median | p90 | max | vs ep | per-run vs ep | CPU ms/step/rank "
          "| CPU vs ep | tokens/s | expert busy fwd+bwd max/mean | busy max ms | expert slots max/mean | load max/mean "
          "| top-1 share | spAG MiB/step | re-shard MiB/step | a2a MiB/step | peak tensor MiB/rank "
          "| RSS high-water MiB | loss | dropped | re-shard steps |")


def row(r: dict, ref: dict) -> str:
    """A markdown row; ratios against the reference row `ref` (ep's): "vs ep" is the median of the per-run
    ratios (each repetition against the reference's run next to it), not a ratio of medians over unpaired runs.
    A peer whose all-to-all goes through a comm layer we do not count (megatron_moe) shows n/c; a peer's expert
    slots per rank are not reported (nan)."""
    from benchmarks.measure import per_run_ratios

    a2a = "n/c" if r["variant"] == "megatron_moe" else f"{r['a2a_mib']:.2f}"
    paired = per_run_ratios(r["run_step_ms"], ref["run_step_ms"])
    runs = ", ".join(f"{x:.2f}" for x in paired)
    return (f"| {r['world']} | {r['workload']} | {r['variant']} | {r['step_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['max_ms']:.1f} | {statistics.median(paired):.2f} | {runs} | {r['cpu_ms']:.1f} | "
            f"{r['cpu_ms'] / ref['cpu_ms']:.2f} | {r['tok_s']:.0f} | {r['busy_max_mean']:.2f} | "
            f"{r['busy_max_ms']:.1f} | {r['slots_max_mean']:.2f} | {r['load_max_mean']:.2f} | "
            f"{r['top1_share']:.3f} | {r['spag_mib']:.2f} | {r['reshard_mib']:.2f} | {a2a} | {r['peak_tensor_mib']:.1f} | "
            f"{r['rss_mib']:.0f} | {r['loss']:.4f} | {r['dropped']} | {r['reshard_steps'] or '-'} |")


def peer_ratios(rows: list[dict]) -> str:
    """A comment line after a workload's rows: sparsetrain EP's step time over DeepSpeed-MoE dropless's
    (ep-ddp is the like-for-like row: dense parameters replicated, as under DeepSpeed ZeRO-0)."""
    ms = {r["variant"]: r["step_ms"] for r in rows}
    if "deepspeed_moe" not in ms or not rows:
        return ""
    parts = [f"{v} / deepspeed_moe = {ms[v] / ms['deepspeed_moe']:.2f}" for v in ("ep-ddp", "ep") if v in ms]
    return f"<!-- {rows[0]['world']} ranks, {rows[0]['workload']}: step time {'; '.join(parts)} -->" if parts else ""


STATIC_EP = ("ep", "ep-ddp", "ep-balanced", "ep-balanced-ddp")


def balance_bound(rows: list[dict]) -> str:
    """A comment line: each static EP row's step with its busiest rank's expert time (forward + backward)
    brought down to the mean, step - (busy max - busy mean): what balancing the expert compute alone is worth.
    It leaves out the imbalance outside the expert spans (row gathers, waits for a late rank's exchange), so
    a re-placement can beat it somewhat (measured: drift, 2 ranks, fssdp-lpt-ddp 0.90x ep-ddp vs 0.95x)."""
    parts = []
    for r in rows:
        if r["variant"] in STATIC_EP and r["busy_max_mean"] > 0:  # measured (not nan, not 0)
            saved = r["busy_max_ms"] * (1 - 1 / r["busy_max_mean"])
            parts.append(f"{r['variant']} {r['step_ms'] - saved:.1f} ms = {1 - saved / r['step_ms']:.2f}x its step")
    return (f"<!-- {rows[0]['world']} ranks, {rows[0]['workload']}: balancing expert compute alone would give "
            f"{'; '.join(parts)} -->") if parts else ""


def imbalance_penalty(rows: list[dict]) -> list[str]:
    """Comment lines after a world's workloads, when `balanced` ran too: each variant's step time on a workload
    over its own on balanced routing (same tokens, same top-k: the same expert FLOPs; 1.00 = it pays nothing for
    the imbalance), and the floor of "X / the strongest static EP" for any X that removes all of it: the best
    static EP row's balanced step over its step on the workload."""
    base = {r["variant"]: r["step_ms"] for r in rows if r["workload"] == "balanced"}
    out = []
    for wl in dict.fromkeys(r["workload"] for r in rows if r["workload"] != "balanced"):
        mine = [r for r in rows if r["workload"] == wl and r["variant"] in base]
        if not mine:
            continue
        parts = [f"{r['variant']} {r['step_ms'] / base[r['variant']]:.2f}" for r in mine]
        line = (f"<!-- {mine[0]['world']} ranks, {wl}: step over the same variant's on balanced routing: "
                f"{', '.join(parts)}")
        static = [r for r in mine if r["variant"] in STATIC_EP]
        if static:
            best = min(static, key=lambda r: r["step_ms"])
            line += (f"; a variant balancing everything at {best['variant']}'s balanced cost would be "
                     f"{base[best['variant']] / best['step_ms']:.2f}x {best['variant']} here")
        out.append(line + " -->")
    return out


def refusal(world: int, overrides: list[str]) -> str:
    """The config's one-line refusal of this run (e.g. megatron_moe on a CPU machine), or ''."""
    from sparsetrain.config import ConfigError, load_config, validate_world

    try:
        validate_world(load_config("tiny", MODEL + [f"launch.workers={world}", *overrides]), world)
    except ConfigError as exc:
        return str(exc)
    return ""


def available_strategies() -> set[str]:
    from sparsetrain.parallel import STRATEGIES

    return set(STRATEGIES)


def _runnable(world: int, wl: str, variants: list[str], extra: list[str], have: set[str]) -> list[str]:
    """The variants that run for this (world, workload); prints why the others do not (before any process)."""
    out = []
    for v in variants:
        strategy = next(o.split("=", 1)[1] for o in VARIANTS[v] if o.startswith("parallel.strategy="))
        if strategy not in have:
            print(f"<!-- {v}: parallel.strategy={strategy} not available in this checkout: skipped -->")
            continue
        if v in NEEDS_MEAN_LOAD and not any("router_skew" in o or "routing_trace" in o for o in WORKLOADS[wl]):
            continue
        reason = refusal(world, WORKLOADS[wl] + VARIANTS[v] + extra)
        if reason:
            print(f"| {world} | {wl} | {v} | n/a: {reason} |", flush=True)
            continue
        out.append(v)
    return out


def _run(world: int, wl: str, args: argparse.Namespace, v: str) -> dict:
    """One run of variant `v`: fresh gloo ranks, summarized."""
    from tests.dist_utils import run_distributed

    per_rank = run_distributed(_rank_body, world, WORKLOADS[wl] + VARIANTS[v] + args.extra, args.steps, args.warmup,
                               timeout=3000)
    return summarize(world, wl, v, per_rank, TOKENS_PER_STEP)


def _log(world: int, wl: str, repeats: int, rep: int, v: str, r: dict) -> None:
    print(f"# rep {rep + 1}/{repeats} {world} ranks {wl} {v}: step {r['step_ms']:.1f} ms, "
          f"CPU {r['cpu_ms']:.1f} ms/step/rank", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="first steps not timed")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per variant, fresh processes each, interleaved across variants (rows: medians)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="override for every run")
    ap.add_argument("--json", type=Path, default=None, help="append every row as JSON here")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, o in {**WORKLOADS, **VARIANTS}.items():
            print(f"{name}: {' '.join(o)}")
        return
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be >= 1")
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup {args.warmup} with --steps {args.steps}: need 0 <= warmup < steps (some steps timed)")
    from benchmarks.measure import run_interleaved

    have = available_strategies()
    print(f"# moe_strategies: 16 experts top-2, d_model 128, d_ffn 2048, 2 MoE layers, seq 128, global batch 16, "
          f"{args.steps} steps (first {args.warmup} not timed), {args.repeats} interleaved repetition(s) per "
          f"variant, fresh processes per run", flush=True)
    print(HEADER + "\n" + "|---" * (HEADER.count("|") - 1) + "|", flush=True)
    for world in args.worlds:
        world_rows: list[dict] = []
        for wl in args.workloads:
            variants = _runnable(world, wl, args.variants, args.extra, have)
            res = run_interleaved(variants, args.repeats, partial(_run, world, wl, args),
                                  partial(_log, world, wl, args.repeats))
            rows = [combine(res[v]) for v in variants]
            ref = next((r for r in rows if r["variant"] == "ep"), rows[0] if rows else None)
            for r in rows:
                print(row(r, ref), flush=True)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(r) + "\n")
            for r in rows:
                if not r["same_result"]:
                    print(f"<!-- {world} ranks, {wl}, {r['variant']}: repetitions disagree on loss / dropped / "
                          f"re-shard steps -->", flush=True)
            print(peer_ratios(rows), flush=True)
            print(balance_bound(rows), flush=True)
            world_rows += rows
        for line in imbalance_penalty(world_rows):
            print(line, flush=True)


if __name__ == "__main__":
    main()
