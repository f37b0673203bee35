"""Run under TRITON_INTERPRET=1 (set by test_nm_triton.py): Triton N:M paths vs the reference; prints JSON."""
from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch
from sparsetrain.kernels import (
    choose_path,
    compress_nm,
    grouped_nm_linear,
    nm_linear,
    nm_triton,
    set_benchmark_table,
)
from sparsetrain.kernels.grouped import grouped_linear_reference


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def main() -> None:
    torch.manual_seed(0)
    out: dict[str, float] = {}
    for n, m, b, o, i in [(2, 4, 5, 24, 40), (1, 4, 17, 16, 32), (3, 8, 9, 20, 48), (2, 8, 33, 40, 24),
                          (1, 2, 3, 7, 10), (4, 8, 16, 32, 64)]:
        c = compress_nm(torch.randn(o, i), n, m)
        wd = c.decompress()
        x, dy = torch.randn(b, i), torch.randn(b, o)
        out[f"fwd {n}:{m} {b}x{o}x{i}"] = err(nm_triton.nm_matmul_fwd(x, c), x @ wd.t())
        out[f"dgrad {n}:{m} {b}x{o}x{i}"] = err(nm_triton.nm_matmul_dgrad(dy, c), dy @ wd)
    # autograd through nm_linear(path='triton'): dense masked weight and compressed values
    c = compress_nm(torch.randn(24, 32), 2, 4)
    wd = c.decompress().requires_grad_(True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    y = nm_linear(x, wd, bias, n=2, m=4, path="triton")
    g = torch.randn_like(y)
    y.backward(g)
    x2, w2, b2 = x.detach().clone().requires_grad_(True), wd.detach().clone().requires_grad_(True), \
        bias.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, w2, b2)
    y2.backward(g)
    out["autograd y"] = err(y, y2)
    out["autograd dx"] = err(x.grad, x2.grad)
    out["autograd dw"] = err(wd.grad, w2.grad)
    out["autograd dbias"] = err(bias.grad, b2.grad)
    vals = c.values.clone().requires_grad_(True)
    c.values = vals
    nm_linear(x.detach(), c, path="triton").backward(g)
    out["autograd dvalues"] = err(vals.grad, w2.grad.gather(-1, c.columns()))
    # bf16 / fp16 under the interpreter (its tl.dot on 16-bit floats is wrong): relative error vs fp32 matmul
    for dt in (torch.bfloat16, torch.float16):
        c16 = compress_nm(torch.randn(20, 48).to(dt), 3, 8)
        w16 = c16.decompress().requires_grad_(True)
        x16 = torch.randn(9, 48, dtype=dt, requires_grad=True)
        y16 = nm_linear(x16, w16, n=3, m=8, path="triton")
        g16 = torch.randn_like(y16)
        y16.backward(g16)
        ref = x16.detach().float() @ w16.detach().float().t()
        dx_ref = g16.float() @ w16.detach().float()
        name = str(dt).replace("torch.", "")
        out[f"half {name} y"] = err(y16.float(), ref) / float(ref.abs().max())
        out[f"half {name} dx"] = err(x16.grad.float(), dx_ref) / float(dx_ref.abs().max())
        out[f"half {name} dtype"] = float(y16.dtype == dt and x16.grad.dtype == dt)
    # a dense weight that is not N:M is refused, not silently pruned
    try:
        nm_linear(torch.randn(3, 8), torch.randn(4, 8), n=2, m=4, path="triton")
        out["non-N:M refused"] = 0.0
    except ValueError as e:
        out["non-N:M refused"] = float("is not 2:4 sparse" in str(e))
    # grouped N:M via the triton path, with an empty expert
    counts = [3, 0, 6]
    wg = compress_nm(torch.randn(3, 16, 32), 2, 4)
    xg = torch.randn(9, 32)
    out["grouped"] = err(grouped_nm_linear(xg, wg, counts, path="triton"),
                         grouped_linear_reference(xg, wg.decompress(), counts))
    # dispatcher: picks triton only when its table row beat dense
    xx = torch.randn(8, 32)
    from sparsetrain.kernels import table_key

    key = table_key(xx.device, xx.dtype, 2, 4, 8, 24, 32)
    set_benchmark_table({"entries": {key: {"dense_ms": 2.0, "paths": {"triton": 1.0}}}})
    out["auto picks triton"] = float(choose_path(xx, c, 2, 4)[0] == "triton")
    set_benchmark_table({"entries": {key: {"dense_ms": 2.0, "paths": {"triton": 3.0}}}})
    out["auto avoids slower triton"] = float(choose_path(xx, c, 2, 4)[0] == "reference")
    set_benchmark_table(None)
    out["no table -> reference on cpu"] = float(choose_path(xx, c, 2, 4)[0] == "reference")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
