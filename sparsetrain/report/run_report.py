"""Report for one run directory: loss/val curves, throughput/MFU, expert loads, placement, busy time, memory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsetrain.report.plots import lines, pyplot, read_jsonl, save


def _loss(recs: list[dict[str, Any]], out: Path) -> Path | None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if not lines(ax, recs, ["loss", "val_loss"], "cross entropy (nats/token, interval mean)"):
        plt.close(fig)
        return None
    return save(fig, out / "loss.png")


def _throughput(recs: list[dict[str, Any]], out: Path) -> Path | None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ok = lines(a, recs, ["tokens_per_s"], "tokens/s")
    mfu_keys = [k for k in ("mfu", "tflops_per_rank", "tflops") if any(k in r for r in recs)]
    ok2 = lines(b, recs, mfu_keys, "MFU / TFLOP/s") if mfu_keys else False
    if not ok2:
        b.text(0.5, 0.5, "no MFU recorded", ha="center", va="center", transform=b.transAxes)
    if not ok:
        plt.close(fig)
        return None
    return save(fig, out / "throughput.png")


def _expert_loads(loads: list[dict[str, Any]], out: Path) -> Path | None:
    if not loads:
        return None
    import numpy as np

    plt = pyplot()
    counts = np.array([r["counts"] for r in loads], dtype=float)  # [steps, L, E]
    steps = [r["step"] for r in loads]
    n_layers = counts.shape[1]
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.6 + 1.6 * n_layers), squeeze=False)
    share = counts / np.clip(counts.sum(axis=2, keepdims=True), 1e-9, None)  # per-step share of tokens
    for li in range(n_layers):
        ax = axes[li][0]
        im = ax.imshow(share[:, li, :].T, aspect="auto", origin="lower", cmap="viridis",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, counts.shape[2] - 0.5))
        ax.set_ylabel(f"layer {li}\nexpert")
        fig.colorbar(im, ax=ax, label="token share")
    axes[-1][0].set_xlabel("step")
    return save(fig, out / "expert_load.png")


def _placement(places: list[dict[str, Any]], out: Path) -> Path | None:
    if not places:
        return None
    import numpy as np

    plt = pyplot()
    n_layers = len(places[0]["layers"])
    steps = [p["step"] for p in places]
    fig, axes = plt.subplots(n_layers, 2, figsize=(11, 1.6 + 1.6 * n_layers), squeeze=False)
    for li in range(n_layers):
        owners = np.array([p["layers"][li]["owners"] for p in places], dtype=float)  # [records, E]
        copies = np.array([[len(c) for c in p["layers"][li]["copies"]] for p in places], dtype=float)
        for ax, data, title in ((axes[li][0], owners, "owner rank"), (axes[li][1], copies, "copies")):
            im = ax.imshow(data.T, aspect="auto", origin="lower", cmap="tab20" if title == "owner rank" else "magma",
                           interpolation="nearest")
            ax.set_xticks(range(len(steps)))
            ax.set_xticklabels([str(s + 1) for s in steps], fontsize=6, rotation=90)
            ax.set_ylabel(f"layer {li}\nexpert")
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax)
    return save(fig, out / "placement.png")


def _rank_busy(recs: list[dict[str, Any]], out: Path) -> Path | None:
    rows = [r for r in recs if isinstance(r.get("ranks"), dict)]
    if not rows:
        return None
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    world = max(len(r["ranks"]["experts_ms"]) for r in rows)  # a run resumed on another world size changes it
    for rank in range(world):
        busy = [(r["step"] + 1, r["ranks"]["attention_cpu_ms"][rank] + r["ranks"]["experts_cpu_ms"][rank])
                for r in rows if rank < len(r["ranks"]["experts_cpu_ms"])]
        a.plot(*zip(*busy), marker=".", label=f"rank {rank}")
    a.set_xlabel("step")
    a.set_ylabel("forward busy CPU ms (attention + experts)")
    a.legend(fontsize=8)
    last = rows[-1]["ranks"]
    spans = [k for k in ("attention_ms", "dispatch_ms", "experts_ms", "combine_ms", "spag_wait_ms", "sprs_ms",
                         "optimizer_ms") if k in last]
    bottom = [0.0] * len(last["experts_ms"])  # the last record's ranks
    for k in spans:
        b.bar(range(len(bottom)), last[k], bottom=bottom, label=k[:-3])
        bottom = [x + y for x, y in zip(bottom, last[k])]
    b.set_xlabel("rank")
    b.set_ylabel(f"wall ms at step {rows[-1]['step'] + 1}")
    b.legend(fontsize=7)
    return save(fig, out / "rank_busy.png")


def _memory(recs: list[dict[str, Any]], out: Path) -> Path | None:
    """Peak memory per rank (MiB, `peak_memory_mib`) and any other memory scalar, against step."""
    per_rank = [r for r in recs if isinstance(r.get("peak_memory_mib"), list) and r["peak_memory_mib"]]
    keys = sorted({k for r in recs for k, v in r.items() if "mem" in k and isinstance(v, (int, float))})
    if not per_rank and not keys:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for rank in range(max((len(r["peak_memory_mib"]) for r in per_rank), default=0)):  # world may change
        pts = [(r["step"] + 1, r["peak_memory_mib"][rank]) for r in per_rank if rank < len(r["peak_memory_mib"])]
        ax.plot(*zip(*pts), marker=".", label=f"peak rank {rank}")
    if keys:
        lines(ax, recs, keys, "memory")
    ax.set_xlabel("step")
    ax.set_ylabel("MiB (peak per rank) / as named")
    ax.legend(fontsize=7)
    return save(fig, out / "memory.png")


def run_report(run_dir: Path, out: Path) -> Path:
    """Write the run's PNGs and report.md under `out`; returns the Markdown path."""
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "step" in r and "loss" in r]
    if not recs:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no training records (step, loss)")
    out.mkdir(parents=True, exist_ok=True)
    pictures = {
        "Loss (interval means) and validation loss": _loss(recs, out),
        "Throughput and MFU": _throughput(recs, out),
        "Expert load per layer over steps": _expert_loads(read_jsonl(run_dir / "expert_loads.jsonl"), out),
        "Placement over time (owners and copies)": _placement(read_jsonl(run_dir / "placements.jsonl"), out),
        "Per-rank busy time": _rank_busy(recs, out),
        "Memory": _memory(recs, out),
    }
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    md = [f"# Run report: `{run_dir}`", ""]
    if summary:
        md += ["| key | value |", "|---|---|"]
        md += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
               for k, v in summary.items() if not isinstance(v, (dict, list))]
        md.append("")
    last = recs[-1]
    md.append(f"{len(recs)} logged intervals; last at step {last['step'] + 1}: loss {last['loss']:.4f}"
              + (f", val {last['val_loss']:.4f}" if "val_loss" in last else "")
              + (f", {last['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in last else ""))
    md.append("")
    for title, png in pictures.items():
        md += [f"## {title}", ""]
        md.append(f"![{title}]({png.name})" if png else "_not recorded in this run_")
        md.append("")
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
