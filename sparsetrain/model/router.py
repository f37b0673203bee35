"""Token-choice top-k router with load-balancing aux loss, z-loss and aux-loss-free bias."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparsetrain.offload.saved import recomputing

CountReducer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RouterOutput:
    """What the router hands the dispatcher and the trainer."""

    expert_ids: torch.Tensor  # [T, k] long
    weights: torch.Tensor  # [T, k] combine weights (softmax probs of the chosen experts)
    tokens_per_expert: torch.Tensor  # [E] long, this rank's routed slots per expert
    aux_loss: torch.Tensor  # scalar load-balancing loss (already times its coefficient)
    z_loss: torch.Tensor  # scalar router z-loss (already times its coefficient)
    scores: torch.Tensor | None = None  # [T, k] gate probabilities of the chosen experts (before top-k renorm)

    def gate_scores(self) -> torch.Tensor:
        """[T, k] gate scores that order slots for capacity drops (the raw probabilities when known)."""
        return self.scores if self.scores is not None else self.weights


def zipf_log_prior(num_experts: int, s: float) -> torch.Tensor:
    """log p_e for a Zipf(s) distribution over experts (expert 0 hottest)."""
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float32)
    p = ranks.pow(-s)
    return (p / p.sum()).log()  # [E]


class TopKRouter(nn.Module):
    """Softmax top-k gating (top-2 default); returns its losses explicitly."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 0.001, balance: str = "aux_loss", bias_update_rate: float = 1e-3,
                 router_skew: float = 0.0) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.balance, self.bias_update_rate = balance, bias_update_rate
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        # aux-loss-free balancing: a bias added for selection only, updated outside autograd
        self.router_skew = router_skew
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        self.register_buffer("skew_prior", torch.zeros(num_experts), persistent=False)
        # Strategies set this to all-reduce counts so the aux loss / bias see the global batch.
        self.reduce_counts: CountReducer = lambda c: c
        self._pending_counts = torch.zeros(num_experts)
        if not self.expert_bias.is_meta:
            self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the buffers on their device: after meta-device construction they hold garbage."""
        dev = self.expert_bias.device
        self.expert_bias.zero_()
        prior = zipf_log_prior(self.num_experts, self.router_skew) if self.router_skew > 0 \
            else torch.zeros(self.num_experts)
        self.skew_prior.copy_(prior)
        self._pending_counts = torch.zeros(self.num_experts, device=dev)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x [T, d_model] -> routing decisions for T tokens."""
        logits = self.gate(x).float() + self.skew_prior  # [T, E]
        probs = logits.softmax(dim=-1)
        select = probs + self.expert_bias if self.balance == "aux_free" else probs
        _, expert_ids = torch.topk(select, self.top_k, dim=-1)  # [T, k]
        weights = probs.gather(-1, expert_ids)  # [T, k]
        scores = weights.detach()
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(expert_ids.flatten(), minlength=self.num_experts)  # [E]
        global_counts = self.reduce_counts(counts.detach().float())
        if self.training and self.balance == "aux_free" and not recomputing():  # a checkpoint replay: counted
            self._pending_counts = self._pending_counts.to(global_counts) + global_counts
        aux = x.new_zeros((), dtype=torch.float32)
        if self.aux_loss_coef > 0 and self.balance == "aux_loss":
            # Switch/GShard: E * sum_e f_e * P_e with f from the global batch, P from local tokens;
            # the mean over ranks of this equals the single-process value on the global batch.
            f = global_counts / global_counts.sum().clamp_min(1.0)  # [E]
            p_mean = probs.mean(dim=0)  # [E]
            aux = self.aux_loss_coef * self.num_experts * (f * p_mean).sum()
        z = x.new_zeros((), dtype=torch.float32)
        if self.z_loss_coef > 0:
            z = self.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return RouterOutput(expert_ids, weights.to(x.dtype), counts, aux, z, scores)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free step (call after the optimizer step): push bias toward under-loaded experts."""
        if self.balance != "aux_free" or self._pending_counts.sum() == 0:
            return
        c = self._pending_counts.to(self.expert_bias)
        self.expert_bias += self.bias_update_rate * torch.sign(c.mean() - c)
        self._pending_counts = torch.zeros_like(c)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate.weight, std=std)


def expected_uniform_loss(vocab: int) -> float:
    return math.log(vocab)
