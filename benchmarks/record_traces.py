"""Record routing traces: per-step, per-layer expert loads of real short training runs on the stdlib corpus.

One single-process run per balancing mode (aux loss on, aux loss off, aux-loss-free bias), the benchmark's
model shape (16 experts top-2, 2 MoE layers, d_model 128, d_ffn 2048, seq 128, global batch 16), learned
routing. Each run's `expert_loads.jsonl` (global slots per expert per MoE layer, one line per step) is
written, as integers, to benchmarks/traces/<mode>.jsonl; replay one with `--set moe.routing_trace=PATH`.

    python benchmarks/record_traces.py                 # 150 steps each, all three modes
    python benchmarks/record_traces.py --steps 50 --modes aux_on
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.seq_len=128", "moe.num_experts=16",
         "moe.top_k=2", "moe.d_ffn=2048", "data.batch_size=16", "train.eval_every=0", "train.log_every=25",
         "train.progress=false", "checkpoint.save_final=false", "checkpoint.resume=false",
         "launch.workers=1", "launch.backend=inline", "parallel.strategy=none", "launch.torch_threads=1"]
MODES = {
    "aux_on": ["moe.balance=aux_loss", "moe.aux_loss_coef=0.01"],
    "aux_off": ["moe.balance=aux_loss", "moe.aux_loss_coef=0.0"],
    "aux_free": ["moe.balance=aux_free", "moe.aux_loss_coef=0.0", "moe.bias_update_rate=0.001"],
}


def record(mode: str, steps: int, seed: int, out: Path) -> Path:
    """Train one run and write its loads as an integer trace; returns the trace path."""
    import torch

    from sparsetrain.config import load_config
    from sparsetrain.train.trainer import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("tiny", SHAPE + MODES[mode] + [f"train.steps={steps}", f"train.seed={seed}",
                                                         f"train.out_dir={tmp}"])
        Trainer(cfg).fit()
        lines = (Path(tmp) / "expert_loads.jsonl").read_text().splitlines()
    path = out / f"{mode}.jsonl"
    with path.open("w") as f:
        for line in lines:
            rec = json.loads(line)
            f.write(json.dumps({"step": rec["step"], "counts": [[round(c) for c in row] for row in rec["counts"]]},
                               separators=(",", ":")) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "traces")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        print(f"recorded {record(mode, args.steps, args.seed, args.out)}", flush=True)


if __name__ == "__main__":
    main()
