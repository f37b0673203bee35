"""Compressed N:M model export: exact round trip into fresh models, header checks, bytes vs the dense export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsetrain.config import load_config
from sparsetrain.model.gpt import GPT, build_model
from sparsetrain.sparsity import NMConfig, masked_state_dict, nm_sparsifier, sparsify_
from sparsetrain.sparsity.export import export_compressed, load_compressed, read_compressed

pytestmark = pytest.mark.unit

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=16", "model.moe_every=2",
         "model.d_ffn_dense=64", "moe.num_experts=4", "moe.top_k=2", "moe.d_ffn=32", "parallel.strategy=none",
         "launch.workers=1"]


def small_model(seed: int = 0) -> GPT:
    cfg = load_config("tiny", SMALL + [f"train.seed={seed}"])
    return build_model(cfg, "cpu")


def sparse_model(nm: NMConfig, train_steps: int = 2, seed: int = 0) -> GPT:
    """Small GPT-MoE (one dense-MLP block, one MoE block), sparsified, a few SR-STE steps so weights move."""
    model = sparsify_(small_model(seed), nm)
    sp = nm_sparsifier(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for step in range(train_steps):
        x = torch.randint(0, 256, (4, 16), generator=g)
        out = model(x, x.roll(-1, 1))
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sp.step(step + 1)
    return model


def logits(model: GPT, seed: int = 7) -> torch.Tensor:
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(x).logits


ALL = ["experts", "mlp", "attn"]


@pytest.mark.parametrize("transposable", [False, True])
def test_round_trip_bitwise_into_fresh_sparsified_model(tmp_path: Path, transposable: bool) -> None:
    nm = NMConfig(n=2, m=4, method="sr_ste", modules=ALL, transposable=transposable)
    src = sparse_model(nm)
    info = export_compressed(src, tmp_path / "model.nm.pt")
    dst = sparsify_(small_model(seed=1), nm)  # different init: everything must come from the file
    header = load_compressed(dst, tmp_path / "model.nm.pt")
    assert (header["n"], header["m"], header["step"]) == (2, 4, 2)
    assert nm_sparsifier(dst).state.step == 2
    assert torch.equal(logits(dst), logits(src))
    ref, got = masked_state_dict(src), masked_state_dict(dst)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert info.sparse_keys == len(nm_sparsifier(src).weights()) == 2 * 4 + 3 + 3  # 4 attn x2, mlp 3, experts 3


def test_loads_into_plain_model_as_masked_weights(tmp_path: Path) -> None:
    src = sparse_model(NMConfig(n=2, m=4, modules=ALL))
    export_compressed(src, tmp_path / "m.pt", compare_dense=False)
    plain = small_model(seed=3)
    load_compressed(plain, tmp_path / "m.pt")
    assert torch.equal(logits(plain), logits(src))


def test_file_layout_and_bytes_vs_dense(tmp_path: Path) -> None:
    src = sparse_model(NMConfig(n=2, m=4, modules=ALL), train_steps=0)
    info = export_compressed(src, tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    assert obj["header"]["format"] == "sparsetrain.nm_export" and obj["header"]["version"] == 1
    t = obj["tensors"]
    assert "layers.0.attn.wq.weight.__nm_values" in t and "layers.0.attn.wq.weight" not in t
    assert t["layers.1.ffn.experts.w1.__nm_indices"].dtype == torch.uint8
    assert "tok_emb.weight" in t  # dense tensors stay dense
    assert not any(".parametrizations." in k for k in t)
    # sparse tensors shrink to 53.1% (fp32 values + 2-bit positions); embeddings/norms/router stay dense
    assert info.tensor_bytes < info.dense_tensor_bytes and info.file_bytes < info.dense_file_bytes
    _, dense = read_compressed(tmp_path / "m.pt")
    assert all(torch.equal(dense[k], v) for k, v in masked_state_dict(src).items())


def test_bf16_export(tmp_path: Path) -> None:
    src = sparse_model(NMConfig(n=2, m=4, modules=ALL), train_steps=1)
    info = export_compressed(src, tmp_path / "m.pt", dtype=torch.bfloat16)
    header, sd = read_compressed(tmp_path / "m.pt")
    assert header["dtype"] == "bfloat16" and sd["layers.0.attn.wq.weight"].dtype == torch.bfloat16
    ref = masked_state_dict(src)
    assert all(torch.equal(sd[k], v.to(torch.bfloat16)) for k, v in ref.items() if v.is_floating_point())
    assert info.file_bytes < info.dense_file_bytes


def test_structure_decay_stage_and_mask_decay(tmp_path: Path) -> None:
    """Mid-schedule (3:4 stage, beta > 0) the export holds the hard 3:4-masked weights; n:m in the header."""
    nm = NMConfig(n=2, m=4, modules=ALL, structure_decay=["3:4"], structure_decay_every=10, mask_decay_steps=5)
    src = sparse_model(nm, train_steps=2)
    export_compressed(src, tmp_path / "m.pt", compare_dense=False)
    dst = sparsify_(small_model(seed=1), nm)
    header = load_compressed(dst, tmp_path / "m.pt")
    assert (header["n"], header["m"], header["target"]) == (3, 4, [2, 4])
    ref, got = masked_state_dict(src), masked_state_dict(dst)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_rejects_mismatches(tmp_path: Path) -> None:
    src = sparse_model(NMConfig(n=2, m=4, modules=ALL), train_steps=0)
    export_compressed(src, tmp_path / "m.pt", compare_dense=False)
    with pytest.raises(ValueError, match="target 2:4"):
        load_compressed(sparsify_(small_model(), NMConfig(n=1, m=4, modules=ALL)), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="sparse weights differ"):
        load_compressed(sparsify_(small_model(), NMConfig(n=2, m=4, modules=["experts"])), tmp_path / "m.pt")
    torch.save({"tensors": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a sparsetrain.nm_export"):
        load_compressed(small_model(), tmp_path / "bad.pt")
    with pytest.raises(TypeError, match="no N:M sparsifier"):
        export_compressed(small_model(), tmp_path / "x.pt")
