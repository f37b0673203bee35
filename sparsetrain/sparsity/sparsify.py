"""sparsify_: N:M model converter (nn.Linear via parametrize, grouped experts via weight_transform)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsetrain.model.experts import expert_ids_of
from sparsetrain.sparsity.config import NMConfig
from sparsetrain.sparsity.masks import kept_fraction, nm_mask, select_mask, transposable_nm_mask
from sparsetrain.sparsity.schedule import beta_at, structure_stage
from sparsetrain.sparsity.srste import masked_weight, sr_ste

FilterFn = Callable[[nn.Module, str], bool]
EXPERT_WEIGHTS = ("w1", "w2", "w3")
ATTN_NAMES = ("wq", "wk", "wv", "wo")
MLP_NAMES = ("w1", "w2", "w3")
# State-dict key prefix of the masks in use (checkpoints, when sparsity.refresh_every > 1).
MASK_KEY = "nm_masks"
# Module-name parts that always stay dense, whatever the filter says.
NEVER_SPARSE = ("router", "gate", "tok_emb", "tok_embeddings", "embed", "embedding", "embeddings",
                "lm_head", "output", "wte", "wpe")


@dataclass
class NMState:
    """Schedule state shared by every masked weight of one model."""

    cfg: NMConfig
    step: int = 0
    stage: int = 0
    n: int = 0
    m: int = 0
    beta: float = 0.0
    generation: int = 0  # bumped whenever cached masks must be recomputed

    def __post_init__(self) -> None:
        self.advance(0)

    def advance(self, step: int) -> None:
        """Move schedules to optimizer step `step`; invalidate masks on refresh or stage change."""
        stage, n, m = structure_stage(step, self.cfg)
        changed = (n, m) != (self.n, self.m)
        self.step, self.stage, self.n, self.m = step, stage, n, m
        self.beta = beta_at(step, self.cfg)
        if changed or step % self.cfg.refresh_every == 0:
            self.generation += 1

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        """Fresh mask for w at the current stage."""
        return select_mask(w, self.n, self.m, self.cfg.transposable)

    def apply(self, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked weight by the configured method (SR-STE or magnitude), with beta(t)."""
        if self.cfg.method == "sr_ste":  # straight-through here; the lambda_w decay: NMSparsifier.add_decay_grads
            return sr_ste(w, mask, self.beta, 0.0)
        return masked_weight(w, mask, self.beta)


class NMParametrization(nn.Module):
    """parametrize hook for nn.Linear.weight: returns the N:M-masked weight."""

    def __init__(self, state: NMState) -> None:
        super().__init__()
        self.state = state
        self._mask: torch.Tensor | None = None
        self._gen = -1

    def current_mask(self, w: torch.Tensor) -> torch.Tensor:
        """Cached mask, recomputed when the schedule asks for it (every call when refresh_every == 1)."""
        s = self.state
        m = self._mask
        if s.cfg.refresh_every == 1 or m is None or self._gen != s.generation or m.shape != w.shape \
                or m.device != w.device:
            self._mask, self._gen = s.mask(w), s.generation
        return self._mask

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.state.apply(w, self.current_mask(w))


class NMExpertTransform:
    """GroupedExperts.weight_transform: masks the stacked weight it is given; masks cached per expert id."""

    def __init__(self, state: NMState, previous: Callable | None = None) -> None:
        self.state = state
        self.previous = previous
        self.cache: dict[tuple[str, int], tuple[int, torch.Tensor]] = {}

    def masks(self, name: str, w: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """Masks [E_here, out, in] for the experts `ids` of the stacked weight w."""
        s = self.state
        if s.cfg.refresh_every == 1:
            return s.mask(w)
        stale = []
        for i, e in enumerate(ids):
            hit = self.cache.get((name, e))
            if hit is None or hit[0] != s.generation or hit[1].shape != w.shape[1:] or hit[1].device != w.device:
                stale.append(i)
        if stale:
            fresh = s.mask(w[stale])  # [len(stale), out, in]
            for j, i in enumerate(stale):
                self.cache[(name, ids[i])] = (s.generation, fresh[j])
        return torch.stack([self.cache[(name, e)][1] for e in ids])  # [E_here, out, in]

    def __call__(self, name: str, w: torch.Tensor, ids: list[int]) -> torch.Tensor:
        if self.previous is not None:
            w = self.previous(name, w, ids)
        if len(ids) != w.shape[0]:
            raise ValueError(f"weight_transform({name}): {len(ids)} expert ids for a stack of {w.shape[0]}")
        return self.state.apply(w, self.masks(name, w, ids))


def is_grouped_experts(module: nn.Module) -> bool:
    """Duck-typed GroupedExperts: 3-D parameters w1/w2/w3 and a weight_transform attribute."""
    return hasattr(module, "weight_transform") and all(
        isinstance(getattr(module, k, None), nn.Parameter) and getattr(module, k).dim() == 3 for k in EXPERT_WEIGHTS)


def never_sparse(module: nn.Module, fqn: str) -> bool:
    """Router, embeddings and the LM head stay dense."""
    return isinstance(module, nn.Embedding) or any(p in NEVER_SPARSE for p in fqn.split("."))


def default_filter(cfg: NMConfig) -> FilterFn:
    """Filter from cfg.modules: 'experts' (grouped experts), 'mlp' (Linear w1/w2/w3), 'attn' (wq/wk/wv/wo)."""
    kinds = set(cfg.modules)

    def keep(module: nn.Module, fqn: str) -> bool:
        if is_grouped_experts(module):
            return "experts" in kinds
        if isinstance(module, nn.Linear):
            leaf = fqn.rsplit(".", 1)[-1]
            return ("attn" in kinds and leaf in ATTN_NAMES) or ("mlp" in kinds and leaf in MLP_NAMES)
        return False

    return keep


def _check_shape(fqn: str, shape: tuple[int, ...], cfg: NMConfig) -> None:
    ms = sorted({m for _, m in cfg.stages()})
    out_f, in_f = shape[-2], shape[-1]
    for m in ms:
        if in_f % m or (cfg.transposable and out_f % m):
            need = "both dims" if cfg.transposable else "the input dim"
            raise ValueError(f"cannot sparsify {fqn or 'model'} with weight shape {tuple(shape)}: {need} must be "
                             f"divisible by m={m} (stages {cfg.stages()})")


@dataclass
class NMSparsifier:
    """Owns the schedule: call .step(global_step) after each optimizer step; .stats() for logging."""

    cfg: NMConfig
    state: NMState
    linears: dict[str, nn.Linear] = field(default_factory=dict)
    experts: dict[str, nn.Module] = field(default_factory=dict)
    compute: Any = None  # NMCompute when cfg.kernel != 'reference' (N:M kernels in forward/backward)
    # mask entries of the last state_dict(): (target, tensor, its version then); a checkpoint load writes into them
    slots: dict[str, tuple[tuple[str, ...], torch.Tensor, int]] = field(default_factory=dict)

    def step(self, global_step: int) -> None:
        """Advance decay schedules to `global_step` and refresh masks when due."""
        self.slots = {}
        self.state.advance(global_step)

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Register an optimizer step post-hook that calls step() with a running count; returns the handle."""
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.step(self.state.step + 1)

        return optimizer.register_step_post_hook(hook)

    def weights(self) -> dict[str, torch.Tensor]:
        """The dense (unmasked) weights under sparsity, by name; expert stacks as [E, out, in]."""
        out = {f"{k}.weight": mod.parametrizations.weight.original for k, mod in self.linears.items()}
        for k, mod in self.experts.items():
            out.update({f"{k}.{w}": getattr(mod, w) for w in EXPERT_WEIGHTS})
        return out

    @torch.no_grad()
    def add_decay_grads(self) -> None:
        """SR-STE decay, once per optimizer step on the owned weights: grad += lambda_w * (1 - mask) * W.

        Applied after gradient synchronisation rather than inside every masked-weight backward, so it
        does not scale with gradient accumulation, with the number of ranks averaging the gradient, or
        with the number of FSSDP copies of an expert. The mask is the current magnitude mask of W (the
        forward's mask whenever masks are refreshed every step).
        """
        if self.cfg.method != "sr_ste" or self.cfg.lambda_w == 0:
            return
        for w in self.weights().values():
            if w.grad is None or w.numel() == 0:
                continue
            wl = w.to_local() if hasattr(w, "to_local") else w  # FSDP2: this rank's whole rows
            gl = w.grad.to_local() if hasattr(w.grad, "to_local") else w.grad
            mask = self.state.mask(wl).to(wl.dtype)
            gl.add_(self.cfg.lambda_w * (1 - mask) * wl)

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """density (kept share), kept_magnitude, kept_plain / kept_transposable (|w| kept), stage, n, m, beta."""
        s = self.state
        kept = total = 0.0
        numel = nnz = 0
        plain = transp = 0.0
        for w in self.weights().values():
            w = w.to_local() if hasattr(w, "to_local") else w  # FSDP2: this rank's whole rows
            if w.numel() == 0:
                continue
            a = w.detach().abs().float()
            mask = s.mask(w)
            tot = float(a.sum())
            total += tot
            kept += kept_fraction(w, mask) * tot
            plain += kept_fraction(w, nm_mask(w, s.n, s.m)) * tot
            if w.shape[-2] % s.m == 0:
                transp += kept_fraction(w, transposable_nm_mask(w, s.n, s.m)) * tot
            numel += w.numel()
            nnz += int(mask.sum())
        total = total or 1.0
        return {"density": nnz / max(numel, 1), "kept_magnitude": kept / total, "kept_plain": plain / total,
                "kept_transposable": transp / total, "stage": float(s.stage), "n": float(s.n), "m": float(s.m),
                "beta": s.beta, "step": float(s.step)}

    def state_dict(self) -> dict[str, int]:
        """Schedule position (the masks in use travel in the model's state dict: `mask_entries`)."""
        return {"step": self.state.step}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        """Restore the schedule position; masks a checkpoint load just filled in are used until the next refresh
        (as in the run that saved them), others are recomputed from the weights."""
        step = int(sd["step"])
        self.state.advance(step)
        self.state.generation += 1
        slots, self.slots = self.slots, {}
        if self.refresh_due(step):
            return
        for target, t, version in slots.values():
            if t._version == version or t.is_meta or t.numel() == 0 or int(t.max()) > 1:
                continue  # not in the checkpoint (older, or saved with refresh_every=1), or not in use when saved
            self._adopt(target, t.bool())

    def refresh_due(self, step: int) -> bool:
        """Whether the masks of optimizer step `step` are recomputed from the weights (refresh or stage change)."""
        if step % self.cfg.refresh_every == 0 or step == 0:
            return True
        return structure_stage(step, self.cfg)[1:] != structure_stage(step - 1, self.cfg)[1:]

    def _adopt(self, target: tuple[str, ...], mask: torch.Tensor) -> None:
        gen = self.state.generation
        if target[0] == "linear":
            p = self.linears[target[1]].parametrizations.weight[0]
            p._mask, p._gen = mask, gen
        else:
            tr = self.experts[target[1]].weight_transform
            tr.cache[(target[2], int(target[3]))] = (gen, mask)

    @torch.no_grad()
    def mask_entries(self) -> dict[str, torch.Tensor]:
        """The masks in use as uint8 0/1, keyed `nm_masks.<module>` (Linear) and `nm_masks.<experts>.<id>.<w>`
        (one per expert this module holds, like the weights' per-expert checkpoint keys). A mask not in use now
        (a refresh is due, or none computed yet) is a placeholder of 255s. Every entry is kept in `slots` until the
        next step; `load_state_dict` adopts those a checkpoint load wrote into (their version moved). Empty when
        masks are recomputed every step (refresh_every=1: a pure function of the weights)."""
        self.slots = {}
        if self.cfg.refresh_every == 1:
            return {}
        gen = self.state.generation
        out: dict[str, torch.Tensor] = {}

        def entry(key: str, target: tuple[str, ...], cur: torch.Tensor | None, like: torch.Tensor,
                  shape: tuple[int, ...]) -> None:
            device = (like.to_local() if hasattr(like, "to_local") else like).device
            if cur is not None and tuple(cur.shape) == shape and cur.device == device and not cur.is_meta:
                out[key] = cur.to(torch.uint8)
            else:
                out[key] = torch.full(shape, 255, dtype=torch.uint8, device=device)
            self.slots[key] = (target, out[key], out[key]._version)

        for fqn, mod in self.linears.items():
            p, w = mod.parametrizations.weight[0], mod.parametrizations.weight.original
            cur = p._mask if p._gen == gen else None
            entry(f"{MASK_KEY}.{fqn}", ("linear", fqn), cur, w, tuple(w.shape))
        for fqn, mod in self.experts.items():
            tr = mod.weight_transform
            if not isinstance(tr, NMExpertTransform):
                continue
            for w in EXPERT_WEIGHTS:
                stack = getattr(mod, w)
                for gid in expert_ids_of(mod):
                    hit = tr.cache.get((w, int(gid)))
                    cur = hit[1] if hit is not None and hit[0] == gen else None
                    entry(f"{MASK_KEY}.{fqn}.{int(gid)}.{w}", ("expert", fqn, w, str(int(gid))), cur, stack,
                          tuple(stack.shape[1:]))
        return out


def sparsify_(model: nn.Module, cfg: NMConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Make the selected Linear / grouped-expert weights N:M sparse in place; sets model.nm_sparsifier."""
    keep = filter_fn or default_filter(cfg)
    sp = getattr(model, "nm_sparsifier", None)
    if not isinstance(sp, NMSparsifier):
        sp = NMSparsifier(cfg, NMState(cfg))
        model.register_state_dict_post_hook(_mask_state_hook)
        if cfg.kernel != "reference":
            from sparsetrain.sparsity.nm_compute import NMCompute

            sp.compute = NMCompute(sp.state, cfg.kernel)
    chosen: list[tuple[str, nn.Module]] = []
    for fqn, mod in model.named_modules():
        if never_sparse(mod, fqn) or not keep(mod, fqn):
            continue
        if isinstance(mod, nn.Linear) and not parametrize.is_parametrized(mod, "weight"):
            _check_shape(fqn, tuple(mod.weight.shape), cfg)
            chosen.append((fqn, mod))
        elif is_grouped_experts(mod) and not isinstance(mod.weight_transform, NMExpertTransform):
            for w in EXPERT_WEIGHTS:
                _check_shape(f"{fqn}.{w}", tuple(getattr(mod, w).shape), cfg)
            chosen.append((fqn, mod))
    if not chosen and not (sp.linears or sp.experts):
        raise ValueError(f"sparsity.modules={list(cfg.modules)} selects no weight of this model, so nothing would "
                         "be N:M sparse (experts: the MoE experts, attn: attention projections, mlp: dense FFN "
                         "blocks only)")
    for fqn, mod in chosen:
        if isinstance(mod, nn.Linear):
            parametrize.register_parametrization(mod, "weight", NMParametrization(sp.state))
            sp.linears[fqn] = mod
            if sp.compute is not None:
                sp.compute.install_linear(mod)
        else:
            mod.weight_transform = NMExpertTransform(sp.state, previous=mod.weight_transform)
            sp.experts[fqn] = mod
            if sp.compute is not None:
                mod.grouped_linear_fn = sp.compute.grouped
    model.nm_sparsifier = sp
    return model


def _mask_state_hook(model: nn.Module, sd: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: add the sparsifier's masks in use, so checkpoints save and restore them."""
    sp = getattr(model, "nm_sparsifier", None)
    if isinstance(sp, NMSparsifier):
        sd.update({prefix + k: v for k, v in sp.mask_entries().items()})


def apply_sparsity(model: nn.Module, sparsity: Any) -> NMSparsifier | None:
    """The run's N:M pass: `sparsify_` per the config's `sparsity` section when it is enabled (on a meta model
    too, before sharding: FSDP2 then shards the parametrized originals); its sparsifier, or None when off."""
    if not sparsity.enabled:
        return None
    sparsify_(model, NMConfig.from_config(sparsity))
    return nm_sparsifier(model)


def nm_sparsifier(model: nn.Module) -> NMSparsifier:
    """The sparsifier that sparsify_ attached to `model`."""
    sp = getattr(model, "nm_sparsifier", None)
    if not isinstance(sp, NMSparsifier):
        raise TypeError("model has no N:M sparsifier; call sparsify_(model, cfg) first")
    return sp


@torch.no_grad()
def masked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with plain names and hard-masked (beta = 0) sparse weights: the dense masked export form."""
    sp = nm_sparsifier(model)
    sd = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k and MASK_KEY not in k}
    for name, w in sp.weights().items():
        sd[name] = (w * sp.state.mask(w)).detach().clone()
    return sd
