"""Config fingerprint saved with each checkpoint; resume refuses model-defining changes and logs the rest.

Model-defining keys fix the parameter shapes or what the model computes (sizes, vocab, experts, top-k,
sparsity structure): resuming with another value would load a different model's weights (partially, or
into a model that computes something else), so it is refused, listing every differing key. Everything
else (lr, steps, seed, logging, data, parallel layout, launch) is run control: allowed, and logged.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

MODEL_DEFINING = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.moe_every",
    "model.d_ffn_dense", "model.tie_embeddings", "model.rope_theta", "model.norm_eps",
    "moe.num_experts", "moe.top_k", "moe.d_ffn",
    "sparsity.enabled", "sparsity.n", "sparsity.m", "sparsity.method", "sparsity.modules", "sparsity.transposable",
    "sparsity.structure_decay", "sparsity.structure_decay_every",
)

# what a trained model computes beyond its model-defining keys: the N:M masks in use (cached between refreshes)
# and the pruned weights' decay scale. `eval` and `generate` take them from the checkpoint's config
EVAL_FROM_CHECKPOINT = ("sparsity.refresh_every", "sparsity.mask_decay_steps")

NOT_COMPARED = ("train.out_dir", "checkpoint.dir", "checkpoint.resume")  # where a run resumes from, not what it does


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for a nested config dict."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def fingerprint(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The model-defining values and their SHA-256 (what a checkpoint can be resumed into)."""
    flat = flatten(cfg_dict)
    keys = {k: flat[k] for k in MODEL_DEFINING if k in flat}
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "keys": keys}


def eval_overrides(saved_cfg: dict[str, Any], cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """{key: the checkpoint's value} for each EVAL_FROM_CHECKPOINT key whose value differs in `cfg_dict`."""
    old, new = flatten(saved_cfg), flatten(cfg_dict)
    return {k: old[k] for k in EVAL_FROM_CHECKPOINT if k in old and k in new and old[k] != new[k]}


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, str)) else str(v)


def compare(saved_cfg: dict[str, Any], cfg_dict: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, changed): 'key old -> new' for model-defining and for run-control keys that differ.

    Keys present on one side only (a config written by another version) and NOT_COMPARED are skipped. With
    sparsity off on both sides its recipe keys (n, m, modules, ...) are run control: they change nothing.
    """
    old, new = flatten(saved_cfg), flatten(cfg_dict)
    dense = not old.get("sparsity.enabled") and not new.get("sparsity.enabled")  # the N:M recipe defines nothing
    refused, changed = [], []
    for key in sorted(old.keys() & new.keys()):
        if old[key] != new[key] and key not in NOT_COMPARED:
            defining = key in MODEL_DEFINING and not (dense and key.startswith("sparsity."))
            (refused if defining else changed).append(f"{key} {_show(old[key])} -> {_show(new[key])}")
    return refused, changed
