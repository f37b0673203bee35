"""`parallel.strategy: deepspeed_moe`: DeepSpeed's `deepspeed.moe.layer.MoE` in every MoE block, trained by a
DeepSpeed engine, on the same GPT, data and initial weights as sparsetrain's strategies.

Each block's router gate and its expert-parallel rank's experts are copied into DeepSpeed's gate (`wg`)
and experts (a SwiGLU module with the same w1/w2/w3), so both runtimes start from identical weights. From
the config: `parallel.ep_size`, `moe.top_k` (1 or 2), `moe.capacity_factor` (0 = dropless:
`drop_tokens=False`), `parallel.deepspeed.{zero_stage,min_capacity}`. Second-expert sampling and random
token selection are off, so top-2 ids and combine weights equal sparsetrain's router's. Under a routing
workload (`moe.router_skew`, `moe.routing_trace`) DeepSpeed's gate follows the same per-sequence quotas
(`deepspeed_gate.WorkloadTopKGate`: the logits of experts the workload did not pick are masked). DeepSpeed's aux
loss (E * sum_e f_top1 * P over the rank's tokens) is scaled by `moe.aux_loss_coef`; it has no z-loss.
The engine does the gradient all-reduce (experts over their expert-data-parallel group), clipping
(`train.grad_clip`) and the optimizer step; the trainer sets the learning rate as for every strategy.
DeepSpeed's token all-to-all (forward and backward) is counted in `COMM` 'all_to_all' as ours is: the bytes
this rank sends to other ranks (`count_token_exchange`).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from sparsetrain.config import Config
from sparsetrain.model.gpt import GPT
from sparsetrain.model.layers import MLP
from sparsetrain.model.moe import MoELayer
from sparsetrain.model.router import RouterOutput
from sparsetrain.parallel.comm import all_reduce_host
from sparsetrain.parallel.mesh import DistInfo
from sparsetrain.parallel.strategy import Strategy


def import_deepspeed(device: torch.device) -> Any:
    """`deepspeed`, on CPU with its CPU accelerator and a project-local extension cache."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from sparsetrain.parallel.peers import use_project_extension_cache

    use_project_extension_cache()
    try:
        import deepspeed
    except ImportError:
        raise ImportError("parallel.strategy=deepspeed_moe needs DeepSpeed: pip install 'sparsetrain[deepspeed]' "
                          "(DS_BUILD_OPS=0)") from None
    return deepspeed


def count_token_exchange() -> None:
    """Make DeepSpeed-MoE's token all-to-all add to `COMM` 'all_to_all' the bytes each call sends to other ranks.

    `deepspeed.moe.sharded_moe._AllToAll` (dispatch and combine; its backward applies it again) moves an even
    split of a padded [E, capacity, d] buffer through `deepspeed.comm`: each rank keeps 1/ep of it and sends
    the rest, the convention of our `all_to_all_uneven`. Idempotent."""
    import torch.distributed as dist
    from deepspeed.moe import sharded_moe

    from sparsetrain.telemetry.comm import COMM

    base = sharded_moe._AllToAll
    if getattr(base, "counted", False):
        return

    class CountedAllToAll(base):  # type: ignore[misc, valid-type]
        counted = True

        @staticmethod
        def forward(ctx: Any, group: Any, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            ep = dist.get_world_size(group)
            COMM.add("all_to_all", input.numel() * input.element_size() * (ep - 1) // ep)
            return base.forward(ctx, group, input)

    sharded_moe._AllToAll = CountedAllToAll  # module global: MOELayer.forward and _AllToAll.backward look it up


class SwiGLUExpert(MLP):
    """One expert as DeepSpeed's `Experts` clones it: our dense SwiGLU MLP, w2(silu(w1 x) * w3 x), [out, in]."""


class _NoRouterState:
    """What the trainer asks of `moe.router` on a peer's block without routing workloads (Megatron-Core)."""

    def update_bias(self) -> None:
        """No-op."""


class DeepSpeedMoEBlock(MoELayer):
    """An MoE FFN computed by `deepspeed.moe.layer.MoE`; GPT and the trainer see it as an MoE layer.

    After forward, `last_route` holds DeepSpeed's gating decisions (top-k ids and combine weights of this
    rank's tokens; -1 where capacity dropped a slot), its aux loss times `aux_loss_coef`, and its per-expert
    counts; `last_dropped` the slots capacity dropped.
    """

    def __init__(self, ours: MoELayer, ds_moe: nn.Module, first_expert: int, aux_loss_coef: float) -> None:
        nn.Module.__init__(self)  # not MoELayer's: the router and experts are DeepSpeed's
        self.moe = ds_moe
        from sparsetrain.parallel.peers.deepspeed_gate import RoutingState, WorkloadTopKGate

        self.router = RoutingState(ours.router.workload, ours.router.layer_index)  # the trainer sets .step
        if ours.router.workload is not None:  # benchmark workloads: DeepSpeed's gate follows the same quotas
            g = ds_moe.deepspeed_moe.gate
            ds_moe.deepspeed_moe.gate = WorkloadTopKGate(
                self.router, g.wg.in_features, g.wg.out_features, g.k, g.capacity_factor, g.eval_capacity_factor,
                g.min_capacity, g.noisy_gate_policy, g.drop_tokens, g.use_rts, None, g.top2_2nd_expert_sampling
            ).to(g.wg.weight.device)
        self.aux_loss_coef = aux_loss_coef
        self.top_k = ours.router.top_k
        self.last_route: RouterOutput | None = None
        self.last_dropped = 0
        self._gate_out: tuple | None = None
        with torch.no_grad():
            ds_moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.gate.weight)
            for i, expert in enumerate(ds_moe.deepspeed_moe.experts.deepspeed_experts):
                for name in ("w1", "w2", "w3"):
                    getattr(expert, name).weight.copy_(getattr(ours.experts, name)[first_expert + i])
        ds_moe.deepspeed_moe.gate.register_forward_hook(self._keep_gate_output)

    def _keep_gate_output(self, module: nn.Module, args: Any, out: tuple) -> None:
        self._gate_out = out  # (l_aux, capacity, E, ids [k, T], locations, gates [k, T], exp_counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, d] -> [B, S, d]."""
        self.router.group = x.shape[1]  # tokens per sequence: workload quotas are per sequence
        y, l_aux, counts = self.moe(x)
        ids, gates = self._gate_out[3], self._gate_out[5]  # [k, T] each, sparse routes
        self._gate_out = None
        self.last_dropped = int((ids < 0).sum())
        zero = l_aux.new_zeros(())
        self.last_route = RouterOutput(ids.t().long(), gates.t().to(x.dtype), counts.detach().long(),
                                       self.aux_loss_coef * l_aux.float(), zero.float())
        return y


class DeepSpeedMoE(Strategy):
    """DeepSpeed-MoE as a peer: its MoE layer and engine; dense parameters data parallel under its ZeRO stage."""

    name = "deepspeed_moe"
    checkpoints = False  # the engine's state lives in DeepSpeed's own checkpoint format
    owns_optimizer_step = True

    def __init__(self, cfg: Config, info: DistInfo) -> None:
        super().__init__(cfg, info)
        self.ep_size = (cfg.parallel.ep_size or info.world) if info.world > 1 else 1
        self.engine: Any = None
        self.last_micro = True
        self.ds = import_deepspeed(info.device)

    def apply(self, model: GPT) -> GPT:
        """Swap every MoE FFN for DeepSpeed's MoE layer holding the same gate and this rank's experts."""
        from sparsetrain.model.init import materialize_

        # the peer builds its own expert layers from our weights: materialize ours first (replicated, as the
        # peer's dense parameters are; its experts then hold only this rank's share)
        materialize_(model, self.info.device, self.cfg.train.seed)
        import torch.distributed as dist

        backend = "nccl" if self.info.device.type == "cuda" else "gloo"
        if not dist.is_initialized():  # one process: DeepSpeed still wants a (1-rank) process group
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.ds.init_distributed(dist_backend=backend, dist_init_required=False)
        from deepspeed.moe.layer import MoE

        count_token_exchange()
        m, e = self.cfg.model, self.cfg.moe
        ep_rank = (self.info.rank % self.ep_size) if self.info.world > 1 else 0
        first = ep_rank * (e.num_experts // self.ep_size)
        cf = e.capacity_factor
        for block in model.layers:
            if not block.is_moe:
                continue
            ds_moe = MoE(m.d_model, SwiGLUExpert(m.d_model, e.d_ffn), num_experts=e.num_experts,
                         ep_size=self.ep_size, k=e.top_k, capacity_factor=cf or 1.0, eval_capacity_factor=cf or 1.0,
                         min_capacity=self.cfg.parallel.deepspeed.min_capacity, drop_tokens=cf > 0, use_rts=False,
                         top2_2nd_expert_sampling=False).to(self.info.device)
            block.ffn = DeepSpeedMoEBlock(block.ffn, ds_moe, first, e.aux_loss_coef)
        return model

    def wrap_optimizer(self, model: GPT, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Rebuild the client optimizer with DeepSpeed's MoE parameter groups and start the engine on it."""
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = [{**g, "name": f"group{i}"} for i, g in enumerate(optimizer.param_groups)]  # DeepSpeed keys by name
        client = type(optimizer)(split_params_into_different_moe_groups_for_optimizer(groups))  # groups hold lr, betas
        self.engine, _, _, _ = self.ds.initialize(model=model, optimizer=client, config=self.ds_config(),
                                                       dist_init_required=False)
        return client

    def ds_config(self) -> dict[str, Any]:
        """The engine's config from ours: batch split, accumulation, clipping, ZeRO stage, and the gradient
        all-reduce dtype (`communication_data_type`) from train.grad_reduce_dtype, as for every strategy."""
        t = self.cfg.train
        world = max(self.info.world, 1)
        return {
            "train_batch_size": self.cfg.data.batch_size,
            "train_micro_batch_size_per_gpu": self.cfg.data.batch_size // (world * t.grad_accum),
            "gradient_accumulation_steps": t.grad_accum,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": self.cfg.parallel.deepspeed.zero_stage},
            **({"communication_data_type": "bf16"} if t.grad_reduce_dtype == "bf16" else {}),
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }

    def before_backward(self, last_micro: bool) -> None:
        self.last_micro = last_micro

    def backward(self, loss: torch.Tensor) -> None:
        """The engine's backward (its gradient hooks and, at the last micro-batch, the all-reduce)."""
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided by grad_accum
        if not self.last_micro:
            self.engine.step()  # counts the micro-step; the update happens at the accumulation boundary

    def optimizer_step(self) -> torch.Tensor:
        """Clip, update and zero the gradients through the engine; returns the global gradient norm (before
        clipping). ZeRO-1/2 record it; ZeRO-0 clips fp32 gradients without keeping the norm (its
        `get_global_grad_norm()` is None), so at stage 0 it is measured here from the averaged gradients."""
        own = self._zero0_grad_norm() if self.cfg.parallel.deepspeed.zero_stage == 0 else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if own is None else own
        return torch.tensor(float(norm) if norm is not None else float("nan"))

    def _zero0_grad_norm(self) -> torch.Tensor:
        """sqrt of the sum over ranks of each rank's replication-weighted squared gradient norm (the engine has
        averaged the gradients in its backward at the accumulation boundary)."""
        return all_reduce_host(self.local_grad_sq(self.engine.module)).sqrt()

    def replication(self, name: str, p: torch.Tensor) -> int:
        """Dense parameters are identical on every rank; an expert on world / ep_size (its expert-data group)."""
        return self.info.world // self.ep_size if not getattr(p, "allreduce", True) else self.info.world

    def step_metrics(self, comm: dict[str, int], per_rank: dict[str, torch.Tensor]) -> dict[str, float]:
        """`a2a_MB`: DeepSpeed's token all-to-all bytes (summed over ranks), as EP logs its own."""
        return {"a2a_MB": comm.get("all_to_all", 0) / 2**20, **super().step_metrics(comm, per_rank)}

    def describe(self) -> dict[str, Any]:
        e = self.cfg.moe
        return {"strategy": self.name, "ep_size": self.ep_size, "zero_stage": self.cfg.parallel.deepspeed.zero_stage,
                "drop_tokens": e.capacity_factor > 0, "deepspeed": getattr(self.ds, "__version__", "?"),
                "z_loss": "none (DeepSpeed-MoE has no router z-loss)"}
