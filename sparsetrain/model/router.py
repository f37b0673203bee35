"""Token-choice top-k router with load-balancing aux loss, z-loss and aux-loss-free bias."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparsetrain.model.workloads import RoutingWorkload
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
    probs_mean: torch.Tensor | None = None  # [E] mean gate probability over T (deferred aux loss; has grad)
    # [E] tokens_per_expert summed over every data-parallel rank, when the dispatcher's own count exchange
    # already summed them (EP/FSSDP over the whole world): the model then reduces nothing for the aux loss
    global_tokens_per_expert: torch.Tensor | None = None

    def gate_scores(self) -> torch.Tensor:
        """[T, k] gate scores that order slots for capacity drops (the raw probabilities when known)."""
        return self.scores if self.scores is not None else self.weights


class TopKRouter(nn.Module):
    """Softmax top-k gating (top-2 default); returns its losses explicitly."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 0.001, balance: str = "aux_loss", bias_update_rate: float = 1e-3,
                 workload: RoutingWorkload | None = None, layer_index: int = 0) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.balance, self.bias_update_rate = balance, bias_update_rate
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        # aux-loss-free balancing: a bias added for selection only, updated outside autograd
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        # benchmark routing workload (None = learned routing); `step` is set by the trainer each step
        self.workload, self.layer_index, self.step = workload, layer_index, 0
        # Strategies set this to all-reduce counts so the aux loss / bias see the global batch.
        self.reduce_counts: CountReducer = lambda c: c
        # True inside a GPT: the model reduces every layer's counts in one collective after its forward and
        # calls `aux_loss_from` / `note_global_counts` (standalone routers reduce and compute here).
        self.defer_aux = False
        # capacity mode (set by MoELayer): the aux loss's expert fractions f come from this rank's own routed counts
        # -- the tokens capacity drops over (GShard's per-group aux loss, DeepSpeed's top2gating) -- not the whole
        # batch's; a w-rank step then equals w micro-batches of one process, drops and aux loss alike
        self.local_aux = False
        self._pending_counts = torch.zeros(num_experts)
        if not self.expert_bias.is_meta:
            self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the buffers on their device: after meta-device construction they hold garbage."""
        dev = self.expert_bias.device
        self.expert_bias.zero_()
        self._pending_counts = torch.zeros(self.num_experts, device=dev)

    def forward(self, x: torch.Tensor, group: int | None = None) -> RouterOutput:
        """x [T, d_model] -> routing decisions for T tokens (`group`: tokens per sequence, for workloads)."""
        logits = self.gate(x)  # [T, E], in fp32 at least (fp64 models keep fp64)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        probs = logits.softmax(dim=-1)
        if self.workload is not None:  # quota routing to the workload's target shares, by gate score
            expert_ids = self.workload.route(probs, self.layer_index, self.step, group or x.shape[0])  # [T, k]
        else:
            select = probs + self.expert_bias if self.balance == "aux_free" else probs
            _, expert_ids = torch.topk(select, self.top_k, dim=-1)  # [T, k]
        weights = probs.gather(-1, expert_ids)  # [T, k]
        scores = weights.detach()
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(expert_ids.flatten(), minlength=self.num_experts)  # [E]
        probs_mean = probs.mean(dim=0) if self.uses_aux_loss else None  # [E]
        aux = x.new_zeros((), dtype=torch.float32)
        if not self.defer_aux and self.needs_global_counts():
            global_counts = self.reduce_counts(counts.detach().float())
            self.note_global_counts(global_counts)
            if probs_mean is not None and not self.local_aux:
                aux = self.aux_loss_from(global_counts, probs_mean)
        if not self.defer_aux and probs_mean is not None and self.local_aux:
            aux = self.aux_loss_from(counts.detach().float(), probs_mean)
        z = x.new_zeros((), dtype=torch.float32)
        if self.z_loss_coef > 0:
            z = self.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return RouterOutput(expert_ids, weights.to(x.dtype), counts, aux, z, scores, probs_mean)

    @property
    def uses_aux_loss(self) -> bool:
        return self.aux_loss_coef > 0 and self.balance == "aux_loss"

    def needs_global_counts(self) -> bool:
        """Whether this forward needs the global batch's routed counts (aux loss over the whole batch, or an
        aux-free bias update)."""
        return (self.uses_aux_loss and not self.local_aux) or \
            (self.training and self.balance == "aux_free" and not recomputing())

    def aux_loss_from(self, global_counts: torch.Tensor, probs_mean: torch.Tensor) -> torch.Tensor:
        """Switch/GShard: coef * E * sum_e f_e * P_e with f from the global batch's counts [E] (the rank's own
        under `local_aux`), P the mean gate probability [E] over local tokens; with global counts the mean over
        ranks equals the single-process value."""
        f = global_counts / global_counts.sum().clamp_min(1.0)  # [E]
        return self.aux_loss_coef * self.num_experts * (f.to(probs_mean) * probs_mean).sum()

    @torch.no_grad()
    def note_global_counts(self, global_counts: torch.Tensor) -> None:
        """Accumulate the global batch's counts [E] for the aux-free bias update (not on a checkpoint replay)."""
        if self.training and self.balance == "aux_free" and not recomputing():
            self._pending_counts = self._pending_counts.to(global_counts) + global_counts

    def drop_pending_counts(self) -> None:
        """Forget the counts noted since the last bias update (a skipped or rolled-back step)."""
        self._pending_counts = torch.zeros_like(self._pending_counts)

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
