"""Activation memory benchmark: offload vs none vs activation checkpointing, bytes on device and step time.

CPU: a bytes/correctness report (the "device" is host memory too; step times are printed but are no claim).
CUDA: bytes from torch.cuda.memory_allocated after forward, step time ratio from synchronized medians.

    python benchmarks/offload.py --d-model 128 --layers 4 --seq 128 --batch 8 --steps 5
    # GPU (issue 14 item 6; gpt-moe-s layers, bf16, sequence sweep):
    python benchmarks/offload.py --preset gpt-moe-s --seqs 512,1024,2048,4096 --batch 1 --precision bf16
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from sparsetrain.config import OffloadConfig, load_config
from sparsetrain.model.gpt import GPT, build_model
from sparsetrain.offload import OffloadController, enable_activation_offload
from sparsetrain.offload.activation import _resident_ptrs
from sparsetrain.offload.checkpointing import apply_activation_checkpointing


class SavedBytes:
    """Outer saved-tensor hooks: unique non-parameter storage bytes saved outside the offloaded blocks."""

    def __init__(self, model: GPT) -> None:
        self.resident = _resident_ptrs(model)
        self.bytes, self._seen, self._alive = 0, set(), []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self.resident and st.data_ptr() not in self._seen:
            self._seen.add(st.data_ptr())
            self._alive.append(t)  # keeps the address from being reused while we count
            self.bytes += st.nbytes()
        return t.detach()

    def done(self) -> None:
        self._seen.clear()
        self._alive.clear()


def run(preset: str, cfg_over: list[str], oc: OffloadConfig | None, steps: int, batch: int, device: torch.device,
        ckpt: str = "none", precision: str = "fp32") -> dict[str, Any]:
    """Train `steps` steps (after 2 warm-up steps); bytes from the last step, median step time."""
    cfg = load_config(preset, cfg_over)
    model = build_model(cfg, device)
    apply_activation_checkpointing(model, ckpt)
    ctl: OffloadController | None = enable_activation_offload(model, oc) if oc is not None else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.seq_len), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, rec = [], {}
    for step in range(steps + 2):
        if ctl is not None:
            ctl.reset_stats()
        counter = SavedBytes(model)
        sync()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), amp:
            out = model(x, x)
        counter.done()
        if device.type == "cuda":
            sync()
            rec["device_act_bytes"] = torch.cuda.memory_allocated() - base
        (out.loss + out.aux_loss + out.z_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= 2:
            times.append(time.perf_counter() - t0)
        s = ctl.stats() if ctl is not None else {}
        if device.type != "cuda":
            rec["device_act_bytes"] = counter.bytes + s.get("kept_small_bytes", 0) + s.get("kept_other_bytes", 0)
        rec.update(offloaded=s.get("offloaded_bytes", 0), tensors=s.get("offloaded_tensors", 0),
                   pool_peak=s.get("pool_peak_bytes", 0), new_bufs=s.get("pool_allocations", 0),
                   prefetched=s.get("prefetched_tensors", 0))
    rec["step_s"] = statistics.median(times)
    rec["loss"] = float(out.loss.detach())
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="", help="take model sizes from this preset (e.g. gpt-moe-s)")
    ap.add_argument("--seqs", default="", help="comma-separated sequence lengths to sweep (overrides --seq)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--min-bytes", type=int, default=1 << 16)
    ap.add_argument("--dense", action="store_true", help="dense MLP blocks instead of MoE")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    for seq in ([int(v) for v in a.seqs.split(",")] if a.seqs else [a.seq]):
        table(a, device, seq)


def table(a: argparse.Namespace, device: torch.device, seq: int) -> None:
    """One table of variants at sequence length `seq`."""
    if a.preset:
        over = [f"model.seq_len={seq}"] + (["model.moe_every=1000"] if a.dense else [])
    else:
        over = [f"model.d_model={a.d_model}", f"model.n_layers={a.layers}", f"model.n_heads={a.heads}",
                f"model.seq_len={seq}", "moe.d_ffn=" + str(2 * a.d_model)] + (["model.moe_every=1000"] if a.dense else [])
    mb = a.min_bytes
    on = OffloadConfig(enabled=True, every_k_layers=1, min_tensor_bytes=mb)
    variants: list[tuple[str, OffloadConfig | None, str]] = [
        ("no offload", None, "none"),
        ("offload k=1", on, "none"),
        ("offload k=2", OffloadConfig(enabled=True, every_k_layers=2, min_tensor_bytes=mb), "none"),
        ("offload k=1, no prefetch", OffloadConfig(enabled=True, min_tensor_bytes=mb, prefetch=False), "none"),
        ("ckpt selective", None, "selective"),
        ("ckpt full", None, "full"),
        ("ckpt selective + offload", on, "selective"),
        ("ckpt full + offload", on, "full"),
    ]
    print(f"device={device} preset={a.preset or 'tiny+flags'} seq={seq} batch={a.batch} {a.precision} "
          f"{'dense' if a.dense else 'MoE'} min_tensor_bytes={mb} (bytes: last step; time: median of {a.steps})")
    rows = []
    for name, oc, ckpt in variants:
        try:
            rows.append((name, run(a.preset or "tiny", over, oc, a.steps, a.batch, device, ckpt, a.precision)))
        except torch.cuda.OutOfMemoryError:
            print(f"{name}: out of memory at seq {seq}")
            torch.cuda.empty_cache()
    if not rows or rows[0][0] != "no offload":
        print("baseline did not fit: no ratios at this length")
        return
    base = rows[0][1]
    hdr = (f"{'variant':<26}{'act on device MiB':>18}{'vs none':>9}{'offloaded MiB':>15}{'tensors':>9}"
           f"{'pool peak MiB':>15}{'new bufs':>10}{'step ms':>9}{'time x':>8}{'loss':>9}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows:
        print(f"{name:<26}{r['device_act_bytes'] / 2**20:>18.2f}{r['device_act_bytes'] / base['device_act_bytes']:>9.2f}"
              f"{r['offloaded'] / 2**20:>15.2f}{r['tensors']:>9d}{r['pool_peak'] / 2**20:>15.2f}{r['new_bufs']:>10d}"
              f"{r['step_s'] * 1e3:>9.1f}{r['step_s'] / base['step_s']:>8.2f}{r['loss']:>9.4f}")
    if device.type != "cuda":
        print("CPU run: 'on device' = host memory held by autograd; step-time ratios are not a GPU claim.")


if __name__ == "__main__":
    main()
