"""sparsify_ converter: selection by module kind, masks in forward, schedules, caching, stats, export."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsetrain.config import SparsityConfig
from sparsetrain.model.experts import GroupedExperts
from sparsetrain.sparsity import (
    NMConfig,
    NMExpertTransform,
    compress_nm,
    from_compressed_state_dict,
    masked_state_dict,
    nm_mask,
    nm_sparsifier,
    sparsify_,
    to_compressed_state_dict,
)

pytestmark = pytest.mark.unit


class StandInExperts(nn.Module):
    """Minimal GroupedExperts look-alike (3-D w1/w2/w3 + weight_transform), without the kernels."""

    def __init__(self, e: int, d: int, f: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Parameter(torch.randn(e, f, d)), nn.Parameter(torch.randn(e, f, d))
        self.w2 = nn.Parameter(torch.randn(e, d, f))
        self.weight_transform = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = list(range(self.w1.shape[0]))
        ws = {k: getattr(self, k) for k in ("w1", "w2", "w3")}
        if self.weight_transform is not None:
            ws = {k: self.weight_transform(k, w, ids) for k, w in ws.items()}
        h = torch.nn.functional.silu(torch.einsum("nd,efd->enf", x, ws["w1"])) * torch.einsum("nd,efd->enf", x,
                                                                                                ws["w3"])
        return torch.einsum("enf,edf->nd", h, ws["w2"])


class Tiny(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(10, 16)
        self.attn = nn.ModuleDict({k: nn.Linear(16, 16, bias=False) for k in ("wq", "wk", "wv", "wo")})
        self.mlp = nn.ModuleDict({"w1": nn.Linear(16, 32), "w3": nn.Linear(16, 32), "w2": nn.Linear(32, 16)})
        self.router = nn.Module()
        self.router.gate = nn.Linear(16, 4, bias=False)
        self.experts = experts
        self.lm_head = nn.Linear(16, 10, bias=False)


def _grouped() -> GroupedExperts:
    e = GroupedExperts(4, 16, 32)
    e.reset_parameters(0.5, 0.5)
    return e


def _nm_ok(w: torch.Tensor, n: int, m: int) -> bool:
    return bool(((w.reshape(*w.shape[:-1], -1, m) != 0).sum(-1) <= n).all())


@pytest.mark.parametrize("make_experts", [_grouped, lambda: StandInExperts(3, 16, 32)])
def test_selection_by_modules_and_never_dense_parts(make_experts) -> None:
    model = sparsify_(Tiny(make_experts()), NMConfig(modules=["experts", "mlp", "attn"]))
    sp = nm_sparsifier(model)
    assert sorted(sp.linears) == ["attn.wk", "attn.wo", "attn.wq", "attn.wv", "mlp.w1", "mlp.w2", "mlp.w3"]
    assert list(sp.experts) == ["experts"] and isinstance(model.experts.weight_transform, NMExpertTransform)
    for name in ("router.gate", "lm_head"):
        assert not parametrize.is_parametrized(model.get_submodule(name))
    for lin in sp.linears.values():
        assert _nm_ok(lin.weight, 2, 4)
    only = sparsify_(Tiny(make_experts()), NMConfig(modules=["attn"]))
    assert sorted(nm_sparsifier(only).linears) == ["attn.wk", "attn.wo", "attn.wq", "attn.wv"]
    assert not nm_sparsifier(only).experts
    custom = sparsify_(Tiny(make_experts()), NMConfig(), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
    assert "router.gate" not in nm_sparsifier(custom).linears and "lm_head" not in nm_sparsifier(custom).linears


def test_grouped_experts_forward_uses_masked_weights_and_sr_ste_grad() -> None:
    torch.manual_seed(0)
    model = sparsify_(Tiny(_grouped()), NMConfig(n=2, m=4, method="sr_ste", lambda_w=0.1))
    ex = model.experts
    ws = ex.weights()
    for k, w in ws.items():
        assert _nm_ok(w, 2, 4), k
    x, counts = torch.randn(9, 16), [3, 0, 4, 2]
    y = ex(x, counts)
    dense = GroupedExperts(4, 16, 32)
    with torch.no_grad():
        for k in ("w1", "w2", "w3"):
            getattr(dense, k).copy_(ws[k])
    assert torch.allclose(y, dense(x, counts), atol=1e-6)
    y.square().sum().backward()
    nm_sparsifier(model).add_decay_grads()  # once per optimizer step, after gradient sync
    # pruned positions get the SR-STE decay term on top of the dense straight-through gradient
    ref = {k: getattr(dense, k) for k in ("w1", "w2", "w3")}
    dense(x, counts).square().sum().backward()
    for k in ("w1", "w2", "w3"):
        mask = ws[k] != 0
        expect = ref[k].grad + 0.1 * (~mask) * getattr(ex, k).detach()
        assert torch.allclose(getattr(ex, k).grad, expect, atol=1e-5), k


def test_expert_transform_on_gathered_copy_and_mask_cache() -> None:
    ex = _grouped()
    sparsify_(ex, NMConfig(refresh_every=3))
    sp = nm_sparsifier(ex)
    t: NMExpertTransform = ex.weight_transform
    copy = ex.w1.detach()[[2, 0]].clone()  # a gathered copy of experts 2 and 0
    out = t("w1", copy, [2, 0])
    mask_before = t.cache[("w1", 2)][1].clone()
    assert _nm_ok(out, 2, 4) and torch.equal(out[0] != 0, mask_before)
    assert torch.equal(mask_before, nm_mask(copy[0], 2, 4))
    changed = copy.clone()
    changed[0] = torch.randn_like(changed[0])
    sp.step(1)  # not a refresh step: the cached mask of expert 2 is reused although the weight moved
    assert torch.equal(t("w1", changed, [2, 0])[0] != 0, mask_before)
    sp.step(3)  # refresh step: recomputed from the weight it is given
    out = t("w1", changed, [2, 0])
    assert torch.equal(t.cache[("w1", 2)][1], nm_mask(changed[0], 2, 4))
    assert torch.equal(out[0] != 0, nm_mask(changed[0], 2, 4))
    with pytest.raises(ValueError, match="expert ids"):
        t("w1", copy, [0])


def test_structure_decay_and_mask_decay_through_sparsifier() -> None:
    model = sparsify_(Tiny(_grouped()), NMConfig(n=2, m=8, modules=["mlp"], structure_decay=["6:8", "4:8"],
                                                  structure_decay_every=2, mask_decay_steps=2))
    sp, lin = nm_sparsifier(model), model.mlp["w1"]
    seen = []
    for step in range(7):
        sp.step(step)
        st = sp.stats()
        w = lin.weight
        nnz = (w.reshape(32, -1, 8) != 0).sum(-1).max().item()
        seen.append((int(st["n"]), st["beta"], nnz))
    assert seen == [(6, 1.0, 8), (6, 0.5, 8), (4, 1.0, 8), (4, 0.5, 8), (2, 1.0, 8), (2, 0.5, 8), (2, 0.0, 2)]
    assert sp.stats()["density"] == pytest.approx(0.25)


def test_transposable_stats_and_attach_to_optimizer() -> None:
    model = sparsify_(Tiny(_grouped()), NMConfig(modules=["experts", "attn"], transposable=True, refresh_every=2))
    sp = nm_sparsifier(model)
    w = model.attn["wq"].weight
    assert _nm_ok(w, 2, 4) and _nm_ok(w.t(), 2, 4)
    st = sp.stats()
    assert st["density"] == pytest.approx(0.5)
    assert st["kept_transposable"] == pytest.approx(st["kept_magnitude"])
    assert 0 < st["kept_transposable"] <= st["kept_plain"] <= 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = sp.attach(opt)
    model.attn["wq"].weight.sum().backward()
    opt.step()
    opt.step()
    assert sp.state.step == 2
    handle.remove()
    sp.load_state_dict({"step": 7})
    assert sp.state_dict() == {"step": 7}


def test_masked_state_dict_compresses_exactly() -> None:
    model = sparsify_(Tiny(_grouped()), NMConfig(modules=["experts", "mlp", "attn"]))
    sd = masked_state_dict(model)
    assert "mlp.w1.weight" in sd and not any(".parametrizations." in k for k in sd)
    assert torch.equal(sd["attn.wq.weight"], model.attn["wq"].weight)
    csd = to_compressed_state_dict(sd, 2, 4)
    back = from_compressed_state_dict(csd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert torch.equal(compress_nm(sd["experts.w2"], 2, 4).decompress(), sd["experts.w2"])


def test_config_from_sparsity_config_and_validation() -> None:
    sc = SparsityConfig(enabled=True, n=1, m=4, method="magnitude", modules=["mlp"], structure_decay=["3:4"],
                        structure_decay_every=5, refresh_every=2, mask_decay_steps=3, transposable=True)
    cfg = NMConfig.from_config(sc)
    assert (cfg.n, cfg.m, cfg.method, cfg.modules, cfg.stages()) == (1, 4, "magnitude", ["mlp"], [(3, 4), (1, 4)])
    assert NMConfig.from_config(SimpleNamespace(**vars(SparsityConfig()))).method == "sr_ste"
    for bad, msg in [({"method": "x"}, "allowed: magnitude, sr_ste"), ({"modules": ["router"]}, "allowed"),
                     ({"n": 5}, "0 < n <= m"), ({"refresh_every": 0}, "refresh_every"),
                     ({"structure_decay": ["7:8"]}, "structure_decay_every"),
                     ({"structure_decay": ["a"], "structure_decay_every": 1}, "look like")]:
        with pytest.raises(ValueError, match=msg):
            NMConfig(**bad)
    with pytest.raises(ValueError, match="divisible by m=4"):
        sparsify_(nn.Sequential(nn.Linear(6, 8)), NMConfig(modules=["mlp"]),
                  filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
    with pytest.raises(TypeError, match="no N:M sparsifier"):
        nm_sparsifier(nn.Linear(4, 4))


def test_transposable_mask_of_a_meta_weight_is_a_meta_mask() -> None:
    """m > 4 repairs tiles by reading values: a meta weight (model built on meta) gets a meta mask of its shape."""
    from sparsetrain.sparsity.masks import transposable_nm_mask

    for m in (4, 8):
        mask = transposable_nm_mask(torch.empty(16, 32, device="meta"), 2, m)
        assert mask.is_meta and mask.shape == (16, 32) and mask.dtype == torch.bool


def test_transposable_m8_attn_trains_with_exact_transposable_masks(tmp_path) -> None:
    """sparsity.transposable=true, m=8 on attn: the meta model sparsifies, training runs, and the masks in use
    afterwards are exactly 2:8 along both dims of the materialized weights."""
    from sparsetrain.sparsity.masks import transposable_nm_mask
    from sparsetrain.train.trainer import Trainer
    from tests.train.test_trainer import tiny_cfg

    cfg = tiny_cfg(tmp_path, "sparsity.enabled=true", "sparsity.modules=[attn]", "sparsity.transposable=true",
                   "sparsity.m=8", "sparsity.refresh_every=2", steps=3)
    tr = Trainer(cfg)
    tr.fit()
    linears = nm_sparsifier(tr.model).linears
    assert linears and all(math.isfinite(r["loss"]) for r in tr.history)
    for mod in linears.values():
        w = mod.parametrizations.weight.original
        mask = mod.parametrizations.weight[0].current_mask(w)
        assert not mask.is_meta and mask.shape == w.shape
        rows, cols = w.shape
        assert (mask.reshape(rows, cols // 8, 8).sum(-1) == 2).all()
        assert (mask.t().reshape(cols, rows // 8, 8).sum(-1) == 2).all()
        assert torch.equal(mod.weight != 0, mask)
    tr.sparsifier.step(tr.sparsifier.state.step + 1)  # a refresh: the mask recomputed from the trained weights
    for mod in linears.values():
        w = mod.parametrizations.weight.original
        assert torch.equal(mod.parametrizations.weight[0].current_mask(w), transposable_nm_mask(w, 2, 8))
