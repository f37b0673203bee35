"""`sparsetrain sim predict`: every strategy (and FSSDP planner) at several GPU counts; a table and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsetrain.sim.cluster import Cluster
from sparsetrain.sim.predict import predict
from sparsetrain.sim.shape import SimSetup
from sparsetrain.sim.workload import workload_loads

VARIANTS = ("dp", "ep", "fssdp-hecate", "fssdp-lpt_spill", "fssdp-eplb")
COLUMNS = (("step_time_s", "step ms", 1e3), ("tokens_per_s", "tokens/s", 1.0), ("mfu", "MFU %", 100.0),
           ("token_imbalance", "imbal", 1.0), ("compute_s", "compute ms", 1e3), ("a2a_s", "a2a ms", 1e3),
           ("spag_s", "spAG ms", 1e3), ("sprs_s", "spRS ms", 1e3), ("exposed_comm_s", "exposed ms", 1e3),
           ("latency_s", "latency ms", 1e3), ("mem_per_rank_gib", "mem GiB", 1.0), ("mem_plan_gib", "plan GiB", 1.0),
           ("intra_bytes_per_rank", "intra GB", 1e-9), ("inter_bytes_per_rank", "inter GB", 1e-9))
PLOTS = (("step_time_s", "step time (s)"), ("tokens_per_s", "tokens/s"), ("mfu", "MFU"),
         ("mem_per_rank_gib", "memory per rank (GiB)"), ("mem_plan_gib", "memory per rank, sparsetrain plan (GiB)"), ("inter_bytes_per_rank", "bytes per rank over inter-node links"),
         ("intra_bytes_per_rank", "bytes per rank over intra-node links"))


def variant_setup(s: SimSetup, variant: str) -> SimSetup:
    """'dp' | 'ep' | 'fssdp' | 'fssdp-PLANNER' -> the setup with that strategy and planner."""
    from sparsetrain.parallel.planners import PLANNERS

    strategy, dash, planner = variant.partition("-")
    if dash and (strategy != "fssdp" or planner not in PLANNERS):
        raise ValueError(f"variant {variant!r}: a planner goes with fssdp only (fssdp-PLANNER, PLANNER one of "
                         f"{', '.join(sorted(PLANNERS))}); other variants: dp, ep")
    return s.with_(strategy=strategy, planner=planner or s.planner)


def plan_gib(cfg: Any, variant: str, world: int, batch: int, ep_size: int, device: str) -> float | str:
    """`sparsetrain plan`'s memory (parallel.memory_plan, the runtime's own count) of the fullest rank, GiB; where
    the runtime would refuse the configuration, the one-line reason instead."""
    from sparsetrain.config import ConfigError, config_from_dict, to_dict
    from sparsetrain.parallel.memory_plan import memory_plan

    strategy, _, planner = variant.partition("-")
    d = to_dict(cfg)
    d["parallel"].update(strategy=strategy, ep_size=ep_size if strategy == "ep" else 0)
    if planner:
        d["parallel"]["fssdp"]["planner"] = planner
    d["data"]["batch_size"], d["launch"]["workers"] = batch, world
    try:
        return memory_plan(config_from_dict(d), world, device).max_mib / 1024
    except (ConfigError, ValueError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def scale_rows(s: SimSetup, c: Cluster, gpus: list[int], workload: str, batch_per_gpu: int,
               variants: tuple[str, ...] = VARIANTS, cfg: Any = None) -> list[dict[str, Any]]:
    """One prediction row per (GPU count, variant); the global batch grows with the GPUs (weak scaling).
    With `cfg`, each row also carries `mem_plan_gib` from the runtime's memory plan."""
    from sparsetrain.sim.predict import ep_group_size

    if not variants:
        raise ValueError(f"--variants names no variant; choose from {', '.join(VARIANTS)} (fssdp-PLANNER)")
    loads = workload_loads(workload, s.num_experts, s.n_moe)
    rows = []
    for world in gpus:
        for v in variants:
            vs = variant_setup(s, v).with_(batch_size=batch_per_gpu * world)
            p = predict(vs, c, world, loads)
            row = {"gpus": world, "variant": v, **p.row()}
            if cfg is not None:
                plan = plan_gib(cfg, v, world, vs.batch_size, ep_group_size(vs, world), c.device)
                row["mem_plan_gib"] = plan if isinstance(plan, float) else None
                if isinstance(plan, str):
                    row["refused"] = plan  # the runtime would not start this configuration
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], hbm_bytes: int = 0) -> str:
    """Aligned text table of the main columns; with the cluster's `hbm_bytes`, a line naming the rows whose
    memory per rank does not fit."""
    head = ["gpus", "variant"] + [h for _, h, _ in COLUMNS]
    body = [[str(r["gpus"]), r["variant"]] + [f"{r[k] * f:,.4g}" if r.get(k) is not None else "-"
                                              for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    cap = hbm_bytes / 2**30
    over = [f"{r['gpus']} {r['variant']} ({max(r['mem_per_rank_gib'], r.get('mem_plan_gib') or 0):.1f})"
            for r in rows if hbm_bytes and max(r["mem_per_rank_gib"], r.get("mem_plan_gib") or 0) > cap]
    if over:
        lines.append(f"DO NOT FIT in {cap:.0f} GiB per GPU (hbm_bytes): " + ", ".join(over) + " GiB")
    lines += [f"NOT RUNNABLE {r['gpus']} {r['variant']}: the runtime refuses it ({r['refused']})"
              for r in rows if r.get("refused")]
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """predictions.json + one PNG per metric against GPU count (log2 axis), one line per variant."""
    from sparsetrain.report.plots import pyplot, save

    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps(rows, indent=1))
    plt = pyplot()
    paths = []
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for key, label in PLOTS:
        if not any(r.get(key) is not None for r in rows):
            continue  # e.g. the runtime's memory plan where it refuses every configuration: no empty plot
        fig, ax = plt.subplots(figsize=(7, 4))
        for v in variants:
            pts = [(r["gpus"], r[key]) for r in rows if r["variant"] == v and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        ax.set_xscale("log", base=2)
        if key != "mfu" and any((r.get(key) or 0) > 0 for r in rows):
            ax.set_yscale("log")
        ax.set_xlabel("GPUs")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        paths.append(save(fig, out / f"{key}.png"))
    return paths


def plan_cluster(cfg: Any, cluster: str = "") -> Cluster:
    """The cluster `sparsetrain plan` predicts on: `cluster`, else h100-sxm-8x for GPU configs, cpu-2core otherwise."""
    from sparsetrain.sim.cluster import load_cluster

    gpu = cfg.launch.gpus_per_worker > 0 or cfg.train.device == "cuda"
    return load_cluster(cluster or ("h100-sxm-8x" if gpu else "cpu-2core"))


def plan_prediction(cfg: Any, cluster: str = "") -> str:
    """One line for `sparsetrain plan`: the simulator's step time for the config on launch.workers ranks."""
    from sparsetrain.sim.shape import setup_from_config

    c = plan_cluster(cfg, cluster)
    s = setup_from_config(cfg)
    try:
        p = predict(s, c, cfg.launch.workers, workload_loads(f"zipf:{cfg.moe.router_skew}", s.num_experts, s.n_moe))
    except ValueError as e:  # the plan above stands; only the step time cannot be simulated here
        return f"predicted step on {c.name}: n/a ({e})"
    return (f"predicted step on {c.name} ({cfg.launch.workers} ranks, zipf:{cfg.moe.router_skew}): "
            f"{1e3 * p.step_time_s:.1f} ms (compute {1e3 * p.compute_s:.1f}, all-to-all {1e3 * p.a2a_s:.1f}, "
            f"exposed spAG/spRS/dense {1e3 * p.exposed_comm_s:.1f}), {p.tokens_per_s:,.0f} tokens/s, "
            f"MFU {100 * p.mfu:.1f}% (sparsetrain sim predict; memory: the plan above, the runtime's own count)")
