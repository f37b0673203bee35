"""N:M linear ops: reference correctness, dispatcher choices (table, logging, errors), grouped GEMMs."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from sparsetrain.kernels import (
    NM_PATHS,
    NMPath,
    choose_path,
    compress_nm,
    get_path,
    grouped_linear,
    grouped_linear_reference,
    grouped_nm_linear,
    nm_linear,
    set_benchmark_table,
    table_key,
)
from sparsetrain.kernels.grouped import grouped_mm_eligible
from sparsetrain.kernels.nm_paths import reference_linear

from sparsetrain.sparsity import nm_mask

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_table():
    set_benchmark_table(None)
    yield
    set_benchmark_table(None)


def _masked(*shape: int, n: int = 2, m: int = 4) -> torch.Tensor:
    w = torch.randn(*shape)
    return w * nm_mask(w, n, m)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8)])
def test_reference_compressed_and_dense_agree(nm: tuple[int, int]) -> None:
    n, m = nm
    w = _masked(12, 16, n=n, m=m)
    x = torch.randn(2, 3, 16)
    b = torch.randn(12)
    c = compress_nm(w, n, m)
    y_c = nm_linear(x, c, b)
    y_d = nm_linear(x, w, b, n=n, m=m)
    assert y_c.shape == (2, 3, 12)
    assert torch.allclose(y_c, x @ w.t() + b, atol=1e-5) and torch.allclose(y_d, y_c, atol=1e-6)
    vals = c.values.clone().requires_grad_(True)
    c.values = vals
    nm_linear(x, c).sum().backward()
    dense_grad = torch.ones(6, 12).t() @ x.reshape(6, 16)  # [out, in]
    assert torch.allclose(vals.grad, dense_grad.gather(-1, c.columns()), atol=1e-5)


def test_default_choice_on_cpu_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    x, w = torch.randn(4, 16), _masked(8, 16)
    with caplog.at_level(logging.INFO, logger="sparsetrain.kernels.nm"):
        nm_linear(x, w, n=2, m=4)
        nm_linear(x, w, n=2, m=4)
    lines = [r.getMessage() for r in caplog.records if r.name == "sparsetrain.kernels.nm"]
    assert len(lines) == 1 and "path=reference" in lines[0] and "no table entry" in lines[0]
    assert "cuda_2_4: not a CUDA tensor" in lines[0]


def test_table_picks_only_paths_faster_than_dense(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = []

    def fake_run(x, w, bias, n, m):
        calls.append("fake")
        return reference_linear(x, w, bias, n, m)

    monkeypatch.setitem(NM_PATHS, "fake", NMPath("fake", lambda x, w, n, m: (True, "test"), fake_run))
    x, w = torch.randn(5, 16), _masked(8, 16)
    key = table_key(x.device, x.dtype, 2, 4, 5, 8, 16)
    assert key == "cpu|float32|2:4|8x8x16"
    set_benchmark_table({"entries": {key: {"dense_ms": 1.0, "paths": {"fake": 0.5, "reference": 1.1}}}})
    name, why = choose_path(x, w, 2, 4)
    assert name == "fake" and "2.00x dense" in why
    nm_linear(x, w, n=2, m=4)
    assert calls == ["fake"]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": {key: {"dense_ms": 1.0, "paths": {"fake": 1.5}}}}))
    monkeypatch.setenv("SPARSETRAIN_NM_TABLE", str(path))
    import sparsetrain.kernels.nm_dispatch as nl

    monkeypatch.setattr(nl, "_table_loaded", False)
    name, why = choose_path(x, w, 2, 4)
    assert name == "reference" and "nothing faster than dense" in why and "fake 0.67x" in why
    with pytest.raises(ValueError, match="'entries'"):
        set_benchmark_table({"rows": []})


def test_path_registry_errors() -> None:
    x, w = torch.randn(4, 16), _masked(8, 16)
    with pytest.raises(ValueError, match="known: reference, triton, cuda_2_4"):
        get_path("cusparse")
    with pytest.raises(ValueError, match="known: reference"):
        nm_linear(x, w, n=2, m=4, path="nope")
    with pytest.raises(ValueError, match="'cuda_2_4' is not usable here: not a CUDA tensor"):
        nm_linear(x, w, n=2, m=4, path="cuda_2_4")
    with pytest.raises(ValueError, match="n and m are required"):
        nm_linear(x, w)
    assert not grouped_mm_eligible(x, torch.randn(2, 8, 16), [2, 2])[0]


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 0], [9, 0, 0, 0]])
def test_grouped_linear_matches_reference_and_loop(counts: list[int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 16, requires_grad=True)
    w = torch.randn(4, 8, 16, requires_grad=True)
    y = grouped_linear(x, w, counts)
    ref = grouped_linear_reference(x, w, counts)
    loop = torch.cat([x[sum(counts[:e]):sum(counts[:e + 1])] @ w[e].t() for e in range(4)])
    assert y.shape == (sum(counts), 8) and torch.allclose(y, loop) and torch.allclose(ref, loop)
    if sum(counts):
        y.square().sum().backward()
        assert x.grad.shape == x.shape and w.grad[1].abs().sum() == 0


def test_grouped_nm_linear_reference() -> None:
    counts = [2, 0, 5]
    w = _masked(3, 8, 16)
    x = torch.randn(7, 16)
    expect = grouped_linear_reference(x, w, counts)
    assert torch.allclose(grouped_nm_linear(x, w, counts, n=2, m=4), expect)
    assert torch.allclose(grouped_nm_linear(x, compress_nm(w, 2, 4), counts), expect, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[E, out, in\]"):
        grouped_nm_linear(x, w, [7], n=2, m=4)


def test_import_does_not_pull_triton() -> None:
    code = "import sparsetrain, sparsetrain.kernels, sparsetrain.sparsity, sys; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
