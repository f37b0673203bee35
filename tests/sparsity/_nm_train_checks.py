"""Run under TRITON_INTERPRET=1 (set by test_nm_training_path.py): tiny training with the Triton N:M path vs
the reference path; prints JSON (max loss / parameter differences, prepare and call counts)."""
from __future__ import annotations

import json
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch

from sparsetrain.config import load_config
from sparsetrain.model.gpt import build_model
from sparsetrain.sparsity import NMConfig, nm_sparsifier, sparsify_

SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16", "model.vocab_size=64",
         "moe.num_experts=4", "moe.d_ffn=32"]
STEPS, ACCUM = 2, 2


def train(kernel: str, decay: int) -> dict:
    torch.manual_seed(0)
    cfg = load_config("tiny", SMALL)
    model = build_model(cfg)
    sparsify_(model, NMConfig(modules=["experts", "attn"], kernel=kernel, mask_decay_steps=decay))
    sp = nm_sparsifier(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses, prepares = [], []
    for step in range(STEPS):
        for _ in range(ACCUM):
            x, y = (torch.randint(0, 64, (2, 16), generator=g) for _ in range(2))
            out = model(x, y)
            loss = out.loss + out.aux_loss + out.z_loss
            (loss / ACCUM).backward()
            losses.append(float(out.loss.detach()))
        sp.add_decay_grads()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sp.step(step + 1)
        prepares.append(sp.compute.prepares if sp.compute is not None else 0)
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "prepares": prepares, "calls": dict(sp.compute.calls) if sp.compute is not None else {}}


def main() -> None:
    out: dict = {}
    for decay in (0, 1):
        ref, tri = train("reference", decay), train("triton", decay)
        out[f"loss_diff_{decay}"] = max(abs(a - b) for a, b in zip(ref["losses"], tri["losses"]))
        out[f"param_diff_{decay}"] = max(float((ref["params"][n] - tri["params"][n]).abs().max()) for n in ref["params"])
        out[f"prepares_{decay}"] = tri["prepares"]
        out[f"calls_{decay}"] = tri["calls"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
