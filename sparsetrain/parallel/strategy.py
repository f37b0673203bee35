"""Strategy base: what the trainer asks of a parallel strategy, plus single-process and data-parallel ones."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.config import Config
from sparsetrain.model.experts import GroupedExperts
from sparsetrain.model.gpt import GPT
from sparsetrain.parallel.comm import is_dist, to_comm
from sparsetrain.parallel.mesh import DistInfo


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def expert_modules(model: nn.Module) -> list[tuple[str, GroupedExperts]]:
    """(fqn, module) of every GroupedExperts in depth order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GroupedExperts)]


class Strategy:
    """Single process: no communication. Subclasses override the hooks they need."""

    name = "none"
    checkpoints = True  # False: a peer runtime whose state sparsetrain checkpoints cannot hold (no save/resume)
    owns_optimizer_step = False  # True: optimizer_step() clips, updates and zeroes (e.g. a DeepSpeed engine)

    def __init__(self, cfg: Config, info: DistInfo, mesh: Any = None) -> None:
        self.cfg, self.info, self.mesh = cfg, info, mesh

    def apply(self, model: GPT) -> GPT:
        """Apply the parallel passes to a freshly built model (same init on every rank)."""
        return model

    def mp_policy(self) -> object | None:
        """FSDP2 mixed-precision policy from train.precision / train.grad_reduce_dtype."""
        from sparsetrain.parallel.dense import mixed_precision_policy

        return mixed_precision_policy(self.cfg.train.precision, self.cfg.train.grad_reduce_dtype)

    def allreduce_dtype(self) -> torch.dtype | None:
        """Dtype of the flat gradient all-reduces (parallel.dense=ddp, EP's expert replicas): bf16 under
        train.grad_reduce_dtype=bf16 in either precision, else None (the gradients' own dtype)."""
        return torch.bfloat16 if self.cfg.train.grad_reduce_dtype == "bf16" else None

    def trainable(self, model: GPT) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, param) pairs the optimizer owns on this rank."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def extra_state(self) -> dict[str, Any]:
        """JSON-able strategy state saved with checkpoints (e.g. load history)."""
        return {}

    def load_extra_state(self, state: dict[str, Any], model: GPT) -> None:
        """Restore what extra_state() saved; the trainer calls it before the checkpoint's tensors are loaded."""

    def replication(self, name: str, p: torch.Tensor) -> int:
        """How many ranks hold an identical copy of this (local) gradient; used for the global norm."""
        return 1

    def all_reduce_dense_grads(self, model: GPT, skip: set[torch.nn.Parameter]) -> None:
        """parallel.dense=ddp: average over all ranks the grads of every parameter not in `skip`."""
        if self.cfg.parallel.dense == "ddp":
            from sparsetrain.parallel.dense import all_reduce_grads

            all_reduce_grads([p for p in model.parameters() if p not in skip], self.info.world,
                             dtype=self.allreduce_dtype())

    def wrap_optimizer(self, model: GPT, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Called once with the built optimizer; returns the one whose param_groups get the learning rate."""
        return optimizer

    def before_backward(self, last_micro: bool) -> None:
        """Called before each micro-batch's backward; `last_micro`: the step's gradients complete in it."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (already scaled) loss."""
        loss.backward()

    def optimizer_step(self) -> torch.Tensor:
        """With `owns_optimizer_step`: clip, update, zero the grads; return the gradient norm."""
        raise NotImplementedError(f"strategy {self.name} does not own the optimizer step")

    def finish_backward(self, model: GPT) -> None:
        """Synchronise gradients not handled by module wrappers (e.g. expert grads)."""

    fuses_step_reduction = False  # True: reduce_step_fused below applies (own_grads + finish_own_grads say how)

    def own_grads(self) -> set[torch.nn.Parameter]:
        """Parameters whose gradients the strategy syncs itself (expert grads), outside the dense all-reduce."""
        return set()

    def finish_own_grads(self, model: GPT) -> None:
        """The part of finish_backward that syncs `own_grads` (everything before the dense gradient all-reduce)."""

    def reduce_step_fused(self, model: GPT, stats: torch.Tensor, counts: torch.Tensor | None) -> Any:
        """finish_backward and the trainer's step reduction (`reduce_step`: stats, squared grad norm, counts) in
        ONE collective: with parallel.dense=ddp the step's numbers ride at the end of the flat fp32 dense gradient
        all-reduce (as in a minimal DDP loop, plus a few floats). Returns the StepReduction, or None having done
        nothing (the trainer then runs finish_backward and reduce_step). Not fused under grad_reduce_dtype=bf16:
        the step's numbers need fp32, the gradients then travel in bf16 on their own."""
        if not self.fuses_step_reduction or self.info.world == 1 or not is_dist() or self.cfg.parallel.dense != "ddp":
            return None
        if self.allreduce_dtype() is not None:
            return None
        own = self.own_grads()
        params = [p for p in model.parameters() if p not in own]
        dense = [p.grad for p in params if p.grad is not None]
        if not dense or any(hasattr(p, "to_local") for p in params) or any(g.dtype != torch.float32 for g in dense):
            return None
        from sparsetrain.parallel.step_reduce import fused_reduce_step, grad_sq

        self.finish_own_grads(model)
        share = self.local_grad_sq(model, only=own).cpu() if own else None  # the own grads' share, summed
        red = fused_reduce_step(dense, self.info.world, stats, share, counts)
        dense_sq = grad_sq(dense)  # averaged: the same on every rank, so its global norm is the local one
        red.grad_sq = dense_sq if red.grad_sq is None else red.grad_sq + dense_sq
        return red

    def local_grad_sq(self, model: GPT, only: set[nn.Parameter] | None = None) -> torch.Tensor:
        """This rank's share of the squared global gradient norm (fp64 scalar): each local gradient's
        squared norm divided by how many ranks hold an identical copy; summed over ranks it is the square
        of the global norm (the trainer fuses that sum into its one per-step collective). `only`: of
        these parameters' gradients alone."""
        groups: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}  # (replication, dtype) -> grads
        for name, p in model.named_parameters():
            if p.grad is not None and (only is None or p in only):
                g = local_tensor(p.grad).detach()
                groups.setdefault((self.replication(name, p), g.dtype), []).append(g)
        sq = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for (r, _), grads in groups.items():
            norms = torch._foreach_norm(grads)  # one fused pass per group, no fp64 copies of the grads
            sq += torch.stack([n.to(sq.device, torch.float64) for n in norms]).pow(2).sum() / r
        return sq

    def after_step(self, step: int, model: GPT, optimizer: torch.optim.Optimizer,
                   counts: torch.Tensor | None) -> torch.optim.Optimizer | None:
        """Called after each optimizer step; may return a rebuilt optimizer (re-sharding)."""
        return None

    def reduce_counts(self, c: torch.Tensor) -> torch.Tensor:
        """Sum routed-token counts over the data-parallel ranks (global batch statistics)."""
        if is_dist() and self.info.world > 1:
            out = to_comm(c).clone()
            dist.all_reduce(out)
            return out.to(c.device)
        return c

    def install_count_reducer(self, model: GPT) -> None:
        """The model reduces every MoE layer's counts in one collective per forward."""
        model.reduce_counts = self.reduce_counts

    def local_log_values(self) -> dict[str, float]:
        """This rank's numbers for the log line; the trainer gathers them from every rank in its one
        log-step collective and hands the [world] vectors to `step_metrics`."""
        if not hasattr(self, "rank_tokens"):
            return {}
        return {"rank_tokens": sum(self.rank_tokens.values())}

    def step_metrics(self, comm: dict[str, int], per_rank: dict[str, torch.Tensor]) -> dict[str, float]:
        """Strategy-specific numbers for the log line from bytes summed over ranks and the gathered
        `local_log_values` (each a [world] tensor)."""
        out: dict[str, float] = {}
        if "rank_tokens" in per_rank and self.info.world > 1:
            v = per_rank["rank_tokens"]
            out["rank_tokens_max_mean"] = float(v.max() / v.mean().clamp_min(1e-9))
        return out

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name}


class DataParallel(Strategy):
    """Experts replicated on every rank; dense params by FSDP2 or an averaged all-reduce."""

    name = "dp"
    fuses_step_reduction = True

    def apply(self, model: GPT) -> GPT:
        self.install_count_reducer(model)
        if self.info.world > 1 and self.cfg.parallel.dense == "fsdp2":
            from sparsetrain.parallel.dense import apply_dense_sharding

            apply_dense_sharding(model, self.info, ignored=set(), mp_policy=self.mp_policy(),
                                 reshard=self.cfg.parallel.fsdp_reshard_after_forward)
        return model

    def replication(self, name: str, p: torch.Tensor) -> int:
        return 1 if hasattr(p, "to_local") else self.info.world

    def finish_backward(self, model: GPT) -> None:
        from sparsetrain.parallel.dense import all_reduce_grads

        all_reduce_grads([p for p in model.parameters() if not hasattr(p, "to_local")], self.info.world,
                         dtype=self.allreduce_dtype())
