"""Decoding with and without the KV cache, side by side: CPU seconds, positions run, same tokens.

Untrained weights from the preset (no checkpoint needed): the cost of decoding does not depend on
what the weights learned. Greedy, prompt "def ", one process, one thread. CPU seconds of this
process (time.process_time) so other load on a shared machine does not count.
"""
from __future__ import annotations

import argparse
import time

import torch

from sparsetrain.config import load_config
from sparsetrain.model.gpt import build_model
from sparsetrain.model.sample import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,tiny-bpe")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=0, help="override model.seq_len (0 = the preset's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| preset | seq_len | new tokens | cache CPU s | positions | no-cache CPU s | positions | speedup | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        extra = ["launch.workers=1"] + ([f"model.seq_len={args.seq_len}"] if args.seq_len else [])
        cfg = load_config(preset, extra)
        model = build_model(cfg).eval()
        prompt = list(b"def ")
        generate(model, prompt, 4, temperature=0)  # warm-up
        res = {}
        for cache in (True, False):
            t0 = time.process_time()
            g = generate(model, prompt, args.tokens, temperature=0, use_cache=cache)
            res[cache] = (time.process_time() - t0, g.positions, g.ids)
        (tc, pc, ic), (tn, pn, i_n) = res[True], res[False]
        print(f"| {preset} | {cfg.model.seq_len} | {args.tokens} | {tc:.2f} | {pc} | {tn:.2f} | {pn} | "
              f"{tn / tc:.1f}x | {ic == i_n} |", flush=True)


if __name__ == "__main__":
    main()
