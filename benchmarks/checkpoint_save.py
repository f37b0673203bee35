"""How long a checkpoint save stops training: synchronous vs `checkpoint.async`, local path vs file:// URL.

One process; a GPT-MoE built from the tiny preset with larger shapes, one Adam step taken so the optimizer
state exists. For each target: `save_checkpoint` (blocks until committed) side by side with
`AsyncCheckpointer.save` (returns after staging the state to host memory) and the time until its commit.

    python benchmarks/checkpoint_save.py                       # d_model 512, 4 layers, 8 experts
    python benchmarks/checkpoint_save.py --d-model 256 --repeats 3
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    import torch

    from sparsetrain.config import load_config
    from sparsetrain.model.gpt import build_model
    from sparsetrain.train.async_checkpoint import AsyncCheckpointer
    from sparsetrain.train.checkpoint import save_checkpoint
    from sparsetrain.train.optim import build_optimizer

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cfg = load_config("tiny", [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
                               f"moe.d_ffn={2 * args.d_model}", f"moe.num_experts={args.experts}"])
    model = build_model(cfg)
    opt = build_optimizer(list(model.named_parameters()), cfg.train)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    mib = sum(p.numel() for p in model.parameters()) * 4 * 3 / 2**20  # weights + Adam's two moments, fp32
    print(f"state {mib:.0f} MiB; medians of {args.repeats}")
    print(f"{'target':8s} {'sync save s':>12s} {'async blocks s':>15s} {'async committed s':>18s} {'blocked ratio':>14s}")
    for kind in ("path", "file://"):
        local = tempfile.mkdtemp(prefix="st-ckpt-bench-")
        root = local if kind == "path" else f"file://{local}"
        sync, blocks, total = [], [], []
        ckpt = AsyncCheckpointer()
        for r in range(args.repeats):
            t = time.perf_counter()
            save_checkpoint(root, 2 * r, model, opt, {}, keep=2)
            sync.append(time.perf_counter() - t)
            t = time.perf_counter()
            ckpt.save(root, 2 * r + 1, model, opt, {}, 2)
            blocks.append(time.perf_counter() - t)
            ckpt.wait()
            total.append(time.perf_counter() - t)
        ckpt.close()
        shutil.rmtree(local, ignore_errors=True)
        s, b, c = (statistics.median(x) for x in (sync, blocks, total))
        print(f"{kind:8s} {s:12.2f} {b:15.2f} {c:18.2f} {b / s:14.2f}")


if __name__ == "__main__":
    main()
