"""N:M training quality: dense vs 2:4 SR-STE (plain and transposable) on the tiny preset, same steps and seed.

Each variant trains single-process (parallel.strategy=none) from the same init and the same batches; the table
reports the final validation loss (nats/byte: the tiny preset is byte-level), its ratio to dense, the relative gap,
the density and kept |w| share of the sparsified weights, and wall time (noisy on a shared machine).

    python benchmarks/nm_quality.py                       # dense, sr_ste, sr_ste_transposable; preset's steps
    python benchmarks/nm_quality.py --steps 100 --variants dense sr_ste sr_ste_decay
    python benchmarks/nm_quality.py --modules experts     # sparsify the experts only

Extra recipe variants (all 2:4 SR-STE, within the existing NMConfig options) are listed by --list.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsetrain.config import Config, load_config
from sparsetrain.parallel.mesh import init_distributed

DEFAULT_VARIANTS = ("dense", "sr_ste", "sr_ste_transposable")
TARGET_GAP = 0.05  # issue target: 2:4 SR-STE val loss within 5% of dense

# name -> overrides given (steps, modules). Steps-relative knobs are fractions of the budget.
Recipe = Callable[[int, list[str]], list[str]]


def _sparse(modules: list[str], *extra: str) -> list[str]:
    mods = "[" + ",".join(modules) + "]"
    return ["sparsity.enabled=true", "sparsity.n=2", "sparsity.m=4", "sparsity.method=sr_ste",
            f"sparsity.modules={mods}", *extra]


RECIPES: dict[str, tuple[str, Recipe]] = {
    "dense": ("no sparsity", lambda s, mods: []),
    "sr_ste": ("2:4 SR-STE, lambda_w=2e-4, masks every forward", lambda s, mods: _sparse(mods)),
    "sr_ste_transposable": ("2:4 SR-STE, transposable masks",
                            lambda s, mods: _sparse(mods, "sparsity.transposable=true")),
    "sr_ste_decay": ("2:4 SR-STE + mask decay (pruned weights fade 1->0 over the first half)",
                     lambda s, mods: _sparse(mods, f"sparsity.mask_decay_steps={max(1, s // 2)}")),
    "sr_ste_3of4": ("2:4 SR-STE + structure decay 3:4 for the first third, then 2:4",
                    lambda s, mods: _sparse(mods, "sparsity.structure_decay=['3:4']",
                                            f"sparsity.structure_decay_every={max(1, s // 3)}")),
    "sr_ste_3of4_decay": ("structure decay 3:4 -> 2:4 (thirds) + mask decay within each stage",
                          lambda s, mods: _sparse(mods, "sparsity.structure_decay=['3:4']",
                                                  f"sparsity.structure_decay_every={max(1, s // 3)}",
                                                  f"sparsity.mask_decay_steps={max(1, s // 6)}")),
    "sr_ste_lambda0": ("2:4 SR-STE with lambda_w=0 (plain STE)",
                       lambda s, mods: _sparse(mods, "sparsity.lambda_w=0.0")),
    "sr_ste_lambda2e-3": ("2:4 SR-STE with lambda_w=2e-3 (10x default)",
                          lambda s, mods: _sparse(mods, "sparsity.lambda_w=2e-3")),
    "magnitude": ("2:4 magnitude masking (no straight-through)",
                  lambda s, mods: _sparse(mods, "sparsity.method=magnitude")),
}


def build_cfg(variant: str, steps: int, modules: list[str], eval_every: int, out_root: str,
              threads: int, seed: int = 1337) -> Config:
    """The tiny preset, single process, with the variant's sparsity overrides."""
    base = ["parallel.strategy=none", "launch.workers=1", "launch.backend=inline", f"launch.torch_threads={threads}",
            f"train.steps={steps}", f"train.eval_every={eval_every}", f"train.seed={seed}", "train.device=cpu",
            "checkpoint.save_final=false", "checkpoint.resume=false", "train.progress=false",
            f"train.out_dir={out_root}/{variant}"]
    return load_config("tiny", base + RECIPES[variant][1](steps, modules))


def run_variant(cfg: Config) -> dict[str, Any]:
    """Train one variant; val loss, sparsity stats and wall time."""
    from sparsetrain.model.gpt import build_model
    from sparsetrain.sparsity import masked_state_dict
    from sparsetrain.train.trainer import Trainer

    torch.set_num_threads(cfg.launch.torch_threads)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, init_distributed("cpu"))
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    sp = trainer.sparsifier
    stats = sp.stats() if sp is not None else {"density": 1.0, "kept_magnitude": 1.0}
    n_sparse = sum(w.numel() for w in sp.weights().values()) if sp is not None else 0
    n_params = sum(p.numel() for p in trainer.model.parameters())
    curve = [(r["step"] + 1, r["val_loss"]) for r in trainer.history if "val_loss" in r]
    export_val = summary["val_loss"]
    if sp is not None:  # the hard-masked weights in a plain model: checks the trained forward really was N:M
        plain = build_model(cfg, trainer.device)
        plain.load_state_dict(masked_state_dict(trainer.model))
        trainer.model = plain
        export_val = trainer.evaluate()
    return {"val_loss": summary["val_loss"], "export_val_loss": export_val, "density": stats["density"],
            "kept_magnitude": stats["kept_magnitude"], "sparse_share": n_sparse / max(n_params, 1), "wall_s": wall,
            "val_curve": curve}


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table; ratio and gap against the dense row."""
    dense = rows.get("dense", {}).get("val_loss")
    head = ("variant", "val loss (nats/byte)", "ratio to dense", "gap %", "density", "kept magnitude",
            "sparsified params", "masked-export val", "wall s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        v = r["val_loss"]
        ratio = v / dense if dense else math.nan
        lines.append(f"| {name} | {v:.4f} | {ratio:.4f} | {100 * (ratio - 1):+.2f} | {r['density']:.3f} | "
                     f"{r['kept_magnitude']:.3f} | {r['sparse_share']:.3f} | {r['export_val_loss']:.4f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def verdict(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One line per sparse variant: within the 5% target or not."""
    dense = rows.get("dense", {}).get("val_loss")
    if not dense:
        return ["no dense baseline in this run: no target check"]
    out = []
    for name, r in rows.items():
        if name != "dense":
            gap = r["val_loss"] / dense - 1
            out.append(f"{name}: gap {100 * gap:+.2f}% -> {'MET' if gap <= TARGET_GAP else 'MISSED'} "
                       f"(target <= {100 * TARGET_GAP:.0f}%)")
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per variant (0: the tiny preset's budget)")
    ap.add_argument("--modules", nargs="+", default=["experts", "mlp", "attn"],
                    help="sparsified module kinds (experts mlp attn)")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(RECIPES))
    ap.add_argument("--eval-every", type=int, default=-1,
                    help="validation interval; the last step always evals (0: only the last; -1: the preset's)")
    ap.add_argument("--seed", type=int, default=1337, help="train.seed (init and batches; tiny preset: 1337)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--out-root", default="/tmp/nm_quality", help="per-variant train.out_dir root")
    ap.add_argument("--json", default="", help="also write the raw results here")
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    args = ap.parse_args(argv)
    preset = load_config("tiny")
    args.steps = args.steps or preset.train.steps
    if args.eval_every < 0:
        args.eval_every = preset.train.eval_every
    if args.list:
        for k, (desc, _) in RECIPES.items():
            print(f"{k:20s} {desc}")
        return {}
    print(f"# nm_quality {datetime.date.today()} steps={args.steps} modules={args.modules} "
          f"seed={args.seed} threads={args.threads} torch={torch.__version__}", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for v in args.variants:
        cfg = build_cfg(v, args.steps, args.modules, args.eval_every or args.steps, args.out_root, args.threads, args.seed)
        print(f"## {v}: {RECIPES[v][0]}", flush=True)
        rows[v] = run_variant(cfg)
        print(f"## {v}: val {rows[v]['val_loss']:.4f} curve {rows[v]['val_curve']} wall {rows[v]['wall_s']:.0f}s",
              flush=True)
    print()
    print(table(rows))
    for line in verdict(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
