"""Megatron-Core's MoELayer as a peer (CUDA only): on the same weights and tokens, `parallel.strategy=megatron_moe`
computes what sparsetrain's GPT computes, forward and gradients (world 1 on NCCL; the trainer's run of the
strategy is a row of `make gpu-check`)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


def test_megatron_moe_matches_sparsetrain_forward_and_grads(nccl_group):
    pytest.importorskip("megatron.core")
    from megatron.core import parallel_state

    from sparsetrain.config import load_config
    from sparsetrain.model.gpt import GPT
    from sparsetrain.parallel.mesh import DistInfo
    from sparsetrain.parallel.peers.megatron_moe import MegatronMoE, MegatronMoEBlock

    dev = torch.device("cuda", 0)
    # aux and z losses off: Megatron adds their gradients inside its router, sparsetrain in the trainer's loss
    cfg = load_config("tiny", ["launch.workers=1", "parallel.strategy=megatron_moe", "train.device=cuda",
                               "moe.aux_loss_coef=0", "moe.z_loss_coef=0"])
    ours = GPT(cfg).to(dev)
    peer = copy.deepcopy(ours)
    MegatronMoE(cfg, DistInfo(device=dev)).apply(peer)
    try:
        assert sum(isinstance(b.ffn, MegatronMoEBlock) for b in peer.layers) == len(ours.moe_layers()) > 0
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_len + 1), generator=g).to(dev)
        losses = []
        for model in (ours, peer):
            logits = model(idx[:, :-1]).logits  # [B, S, V]
            loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
            loss.backward()
            losses.append((logits.detach(), loss.detach()))
        torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(peer.tok_emb.weight.grad, ours.tok_emb.weight.grad, rtol=1e-3, atol=1e-6)
        for mine, theirs in zip(ours.moe_layers(), [b.ffn for b in peer.layers if b.is_moe], strict=True):
            torch.testing.assert_close(theirs.moe.router.weight.grad, mine.router.gate.weight.grad,
                                       rtol=1e-3, atol=1e-6)
            for e, expert in enumerate(theirs.moe.experts.local_experts):
                fc1 = torch.cat([mine.experts.w1.grad[e], mine.experts.w3.grad[e]], dim=0)
                torch.testing.assert_close(expert.linear_fc1.weight.grad, fc1, rtol=1e-3, atol=1e-6)
                torch.testing.assert_close(expert.linear_fc2.weight.grad, mine.experts.w2.grad[e],
                                           rtol=1e-3, atol=1e-6)
        # train.precision=bf16: the trainer's autocast; Megatron's layer runs fp32 inside it (its linears are
        # autograd Functions autocast does not reach), the rest of the model in bf16
        peer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = peer(idx[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        torch.testing.assert_close(loss.detach(), losses[0][1], rtol=2e-2, atol=0)
        grads = [p.grad for p in peer.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    finally:
        parallel_state.destroy_model_parallel()
