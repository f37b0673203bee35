"""`parallel.strategy: megatron_moe`: Megatron-Core's `MoELayer` (alltoall token dispatcher) in every MoE block.

CUDA only: Megatron-Core's MoELayer does not run on CPU (it asks for the current CUDA device and creates
CUDA streams), so config validation refuses it on CPU before any process starts and the strategy refuses
a non-CUDA device again here. Same GPT, data and initial weights as sparsetrain's strategies: each block's
router gate and this expert-parallel rank's experts are copied into Megatron's router and `SequentialMLP`
experts (gated fc1 = [w1; w3], fc2 = w2; no Transformer Engine needed). From the config: `parallel.ep_size`,
`moe.top_k`, `moe.capacity_factor` (0 = dropless), `moe.aux_loss_coef`, `moe.z_loss_coef`. Megatron adds
its aux and z losses to the gradients itself (`MoEAuxLossAutoScaler`), so the trainer's aux terms are 0.
Gradients: dense parameters averaged over all ranks, experts summed over their expert-data-parallel
replicas and divided by the world size (as sparsetrain's EP does).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparsetrain.config import Config
from sparsetrain.model.gpt import GPT
from sparsetrain.model.moe import MoELayer
from sparsetrain.model.router import RouterOutput
from sparsetrain.parallel.mesh import DistInfo
from sparsetrain.parallel.peers.deepspeed_moe import _NoRouterState
from sparsetrain.parallel.strategy import Strategy


def import_megatron() -> Any:
    """`megatron.core`, with a clear error naming the extra."""
    try:
        import megatron.core
    except ImportError:
        raise ImportError("parallel.strategy=megatron_moe needs Megatron-Core: pip install 'sparsetrain[megatron]'") \
            from None
    return megatron.core


def _without_transformer_engine() -> None:
    """Megatron-Core 0.16's router GEMM reads `moe_utils.te_general_gemm`, which is bound only when Transformer
    Engine imports: without TE the name is undefined (NameError at the first forward), not None. Bind it to
    None so the router takes its plain torch GEMM, as it does when TE is present but unused."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class MegatronMoEBlock(MoELayer):
    """An MoE FFN computed by Megatron-Core's MoELayer; GPT and the trainer see it as an MoE layer."""

    def __init__(self, ours: MoELayer, mcore_moe: nn.Module, first_expert: int) -> None:
        nn.Module.__init__(self)  # not MoELayer's: the router and experts are Megatron's
        self.moe = mcore_moe
        self.router = _NoRouterState()
        self.top_k = ours.router.top_k
        self.last_route: RouterOutput | None = None
        self.last_dropped = 0
        self._routed: tuple | None = None
        with torch.no_grad():
            mcore_moe.router.weight.copy_(ours.router.gate.weight)
            for i, expert in enumerate(mcore_moe.experts.local_experts):
                e = first_expert + i
                expert.linear_fc1.weight.copy_(torch.cat([ours.experts.w1[e], ours.experts.w3[e]], dim=0))
                expert.linear_fc2.weight.copy_(ours.experts.w2[e])
        mcore_moe.router.register_forward_hook(self._keep_routing)

    def _keep_routing(self, module: nn.Module, args: Any, out: tuple) -> None:
        self._routed = out  # (probs [T, E] zero off the chosen experts, routing_map [T, E] bool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, d] -> [B, S, d] (Megatron works sequence-first: [S, B, d]).

        Megatron-Core's linears and router GEMM are autograd Functions that torch.autocast does not reach
        consistently (the forward runs in bf16, the backward multiplies bf16 grads by the fp32 weights and
        fails); Megatron's own bf16 mode keeps bf16 parameters with fp32 main copies in its optimizer, which
        this adapter does not replicate. Under autocast the layer therefore runs in its parameters' dtype
        (fp32) with autocast off: exact, and slower than a bf16 layer (gpu-check's peer row says so)."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.moe(x.transpose(0, 1).contiguous())  # [S, B, d]
        probs, routing_map = self._routed
        self._routed = None
        weights, ids = torch.topk(probs.detach(), self.top_k, dim=-1)  # [T, k] (T in [S, B] order)
        chosen = torch.topk(routing_map.float(), self.top_k, dim=-1).values.sum()
        self.last_dropped = int(routing_map.shape[0] * self.top_k - chosen)
        zero = x.new_zeros((), dtype=torch.float32)  # aux and z losses reach the grads inside Megatron
        self.last_route = RouterOutput(ids, weights.to(x.dtype), routing_map.sum(0).long(), zero, zero)
        return y.transpose(0, 1)  # [S, B, d] -> [B, S, d]


class MegatronMoE(Strategy):
    """Megatron-Core MoE as a peer (CUDA only): its MoELayer with the alltoall dispatcher, expert parallel."""

    name = "megatron_moe"
    checkpoints = False  # Megatron's expert layout is not sparsetrain's per-expert checkpoint keys

    def __init__(self, cfg: Config, info: DistInfo) -> None:
        super().__init__(cfg, info)
        if info.device.type != "cuda":
            raise ValueError("parallel.strategy=megatron_moe runs only on CUDA GPUs (Megatron-Core's MoELayer "
                             "does not run on CPU); on CPU use deepspeed_moe or ep")
        self.ep_size = (cfg.parallel.ep_size or info.world) if info.world > 1 else 1
        self.mcore = import_megatron()

    def _config(self) -> Any:
        from megatron.core.transformer.transformer_config import TransformerConfig

        m, e = self.cfg.model, self.cfg.moe
        return TransformerConfig(
            num_layers=m.n_layers, hidden_size=m.d_model, num_attention_heads=m.n_heads, ffn_hidden_size=e.d_ffn,
            moe_ffn_hidden_size=e.d_ffn, num_moe_experts=e.num_experts, moe_router_topk=e.top_k,
            moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=e.aux_loss_coef, moe_z_loss_coeff=e.z_loss_coef or None,
            moe_expert_capacity_factor=e.capacity_factor or None, moe_grouped_gemm=False,
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            expert_model_parallel_size=self.ep_size, tensor_model_parallel_size=1,
            params_dtype=torch.float32, perform_initialization=False)

    def apply(self, model: GPT) -> GPT:
        """Swap every MoE FFN for Megatron-Core's MoELayer holding the same gate and this rank's experts."""
        from sparsetrain.model.init import materialize_

        # the peer builds its own expert layers from our weights: materialize ours first (replicated, as the
        # peer's dense parameters are; its experts then hold only this rank's share)
        materialize_(model, self.info.device, self.cfg.train.seed)
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        from megatron.core.transformer.moe.moe_layer import MoELayer as McoreMoELayer
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        _without_transformer_engine()
        if not dist.is_initialized():  # one process: Megatron still wants a (1-rank) process group
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1,
                                                 expert_model_parallel_size=self.ep_size)
        tensor_parallel.model_parallel_cuda_manual_seed(self.cfg.train.seed)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / self.cfg.train.grad_accum, device=self.info.device))
        config, e = self._config(), self.cfg.moe
        spec = get_moe_module_spec(use_te=False, num_experts=e.num_experts, moe_grouped_gemm=False)
        first = parallel_state.get_expert_model_parallel_rank() * (e.num_experts // self.ep_size)
        for li, block in enumerate(model.layers):
            if block.is_moe:
                layer = McoreMoELayer(config, spec.submodules, layer_number=li + 1).to(self.info.device)
                block.ffn = MegatronMoEBlock(block.ffn, layer, first)
        params = list(model.parameters())
        self._experts = [p for p in params if not getattr(p, "allreduce", True)]
        self._dense = [p for p in params if getattr(p, "allreduce", True)]
        self._expert_dp = parallel_state.get_expert_data_parallel_group()
        return model

    def finish_backward(self, model: GPT) -> None:
        """Dense grads averaged over all ranks; expert grads summed over their replicas, divided by world."""
        if self.info.world == 1:
            return
        from sparsetrain.parallel.dense import all_reduce_grads

        all_reduce_grads(self._dense, self.info.world, dtype=self.allreduce_dtype())
        all_reduce_grads(self._experts, self.info.world, group=self._expert_dp, dtype=self.allreduce_dtype())

    def replication(self, name: str, p: torch.Tensor) -> int:
        return self.info.world // self.ep_size if not getattr(p, "allreduce", True) else self.info.world

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "ep_size": self.ep_size, "dispatcher": "alltoall",
                "megatron_core": getattr(self.mcore, "__version__", "?")}
