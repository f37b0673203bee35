"""Config tree: strict keys and types (errors name the key and the file), overrides, validation, presets."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sparsetrain.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    to_dict,
    validate,
)

pytestmark = [pytest.mark.unit]


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


# ------------------------------------------------------------------ keys and types


def test_unknown_key_in_file_names_dotted_key_and_file(tmp_path):
    p = _write(tmp_path, {"model": {"d_model": 64, "bogus": 1}})
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "model.bogus" in msg and str(p) in msg


def test_unknown_nested_key_names_full_path(tmp_path):
    p = _write(tmp_path, {"parallel": {"fssdp": {"slots_per_rnak": 3}}})
    with pytest.raises(ConfigError, match=r"parallel\.fssdp\.slots_per_rnak") as ei:
        load_config(p)
    assert str(p) in str(ei.value)


def test_unknown_top_level_section(tmp_path):
    p = _write(tmp_path, {"modle": {"d_model": 64}})
    with pytest.raises(ConfigError, match="modle"):
        load_config(p)


def test_unknown_set_key():
    with pytest.raises(ConfigError, match=r"model\.bogus") as ei:
        load_config("tiny", ["model.bogus=1"])
    assert "--set" in str(ei.value)


def test_set_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["model.d_model"])


def test_str_for_int_rejected(tmp_path):
    p = _write(tmp_path, {"model": {"d_model": "big"}})
    with pytest.raises(ConfigError, match=r"model\.d_model") as ei:
        load_config(p)
    assert str(p) in str(ei.value)
    with pytest.raises(ConfigError, match=r"model\.d_model"):
        load_config("tiny", ["model.d_model=big"])


def test_int_for_bool_rejected(tmp_path):
    p = _write(tmp_path, {"model": {"tie_embeddings": 1}})
    with pytest.raises(ConfigError, match=r"model\.tie_embeddings") as ei:
        load_config(p)
    assert str(p) in str(ei.value)


def test_bool_for_int_rejected():
    with pytest.raises(ConfigError, match=r"model\.n_layers"):
        load_config("tiny", ["model.n_layers=true"])


def test_int_accepted_for_float(tmp_path):
    p = _write(tmp_path, {"train": {"lr": 1, "min_lr": 0}})
    cfg = load_config(p)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.train.min_lr, float)


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 parses `1e-3` as a string; a float field must still accept it.
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n  min_lr: 1e-4\n")
    cfg = load_config(p)
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.min_lr == pytest.approx(1e-4)
    assert load_config("tiny", ["train.lr=2e-3"]).train.lr == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config("tiny", ["train.lr=fast"])


def test_list_field_type_checked(tmp_path):
    p = _write(tmp_path, {"sparsity": {"modules": "experts"}})
    with pytest.raises(ConfigError, match=r"sparsity\.modules"):
        load_config(p)
    p = _write(tmp_path, {"sparsity": {"modules": ["experts", 3]}})
    with pytest.raises(ConfigError, match=r"sparsity\.modules\[1\]"):
        load_config(p)


def test_section_must_be_mapping(tmp_path):
    p = _write(tmp_path, {"model": 5})
    with pytest.raises(ConfigError, match="model"):
        load_config(p)


def test_nested_sections_and_overrides(tmp_path):
    p = _write(tmp_path, {"parallel": {"strategy": "ep", "fssdp": {"slots_per_rank": 3}}, "launch": {"workers": 1}})
    cfg = load_config(p, ["parallel.fssdp.prefetch=false", "moe.top_k=1"])
    assert cfg.parallel.strategy == "ep"
    assert cfg.parallel.fssdp.slots_per_rank == 3 and cfg.parallel.fssdp.prefetch is False
    assert cfg.moe.top_k == 1
    # untouched fields keep their defaults
    assert cfg.parallel.fssdp.planner == Config().parallel.fssdp.planner


def test_override_wins_over_file(tmp_path):
    p = _write(tmp_path, {"train": {"steps": 7}, "launch": {"workers": 1}})
    assert load_config(p, ["train.steps=9"]).train.steps == 9


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/no/such/config.yaml")


def test_invalid_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML") as ei:
        load_config(p)
    assert str(p) in str(ei.value)


# ------------------------------------------------------------------ validation rules

ONE = ["launch.workers=1"]


@pytest.mark.parametrize("overrides,needle", [
    (["moe.num_experts=4", "moe.top_k=5"], "moe.top_k"),
    (["moe.top_k=0"], "moe.top_k"),
    (["model.d_model=66", "model.n_heads=4"], "model.n_heads"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-0.1"], "train.lr"),
    (["train.steps=0"], "train.steps"),
    (["train.steps=-3"], "train.steps"),
    (["data.batch_size=6", "train.grad_accum=4"], "data.batch_size"),
    (["launch.workers=3", "data.batch_size=16", "parallel.pretend_nodes=0"], "data.batch_size"),
    (["launch.workers=4", "parallel.strategy=ep", "parallel.ep_size=3", "data.batch_size=16",
      "parallel.pretend_nodes=0"], "parallel.ep_size"),
    (["launch.workers=4", "parallel.strategy=fssdp", "parallel.ep_size=3", "data.batch_size=16",
      "parallel.pretend_nodes=0"], "parallel.ep_size"),
    (["launch.workers=4", "parallel.strategy=fssdp", "parallel.ep_size=2", "data.batch_size=16",
      "parallel.pretend_nodes=0"], "has no effect under parallel.strategy=fssdp"),
    (["launch.workers=4", "parallel.strategy=ep", "moe.num_experts=6", "data.batch_size=16",
      "parallel.pretend_nodes=0"], "moe.num_experts"),
    (["launch.workers=4", "parallel.pretend_nodes=3", "data.batch_size=16"], "parallel.pretend_nodes"),
    (["launch.workers=2", "parallel.strategy=none", "parallel.pretend_nodes=0"], "parallel.strategy=none"),
    (["parallel.strategy=bogus"], "parallel.strategy"),
    (["train.precision=fp8"], "train.precision"),
    (["moe.balance=magic"], "moe.balance"),
    (["parallel.fssdp.sprs_post=early"], "parallel.fssdp.sprs_post"),
    (["parallel.fssdp.reshard_early=true", "parallel.fssdp.reshard_every=0"], "parallel.fssdp.reshard_early"),
    (["parallel.fssdp.reshard_early=true", "parallel.fssdp.reshard_every=5", "parallel.fssdp.load_window=1"],
     "parallel.fssdp.load_window >= 2"),
    # full checkpointing recomputes every block already: offload's own checkpointing would do nothing
    (["train.activation_checkpointing=full", "offload.enabled=true", "offload.checkpoint_activations=true"],
     "offload.checkpoint_activations=true has no effect with train.activation_checkpointing=full"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_validation_rules(overrides, needle):
    ov = overrides if any(o.startswith("launch.workers") for o in overrides) else ONE + overrides
    with pytest.raises(ConfigError) as ei:
        load_config("tiny", ov)
    assert needle in str(ei.value)


def test_validation_accepts_valid_world_layouts():
    cfg = load_config("tiny", ["launch.workers=4", "parallel.strategy=ep", "parallel.ep_size=2",
                               "moe.num_experts=8", "data.batch_size=16", "train.grad_accum=2"])
    assert cfg.parallel.ep_size == 2
    # the world size given to validate() wins over launch.workers
    with pytest.raises(ConfigError, match="data.batch_size"):
        validate(cfg, world_size=3)


def test_fssdp_does_not_require_expert_divisibility():
    cfg = load_config("tiny", ["launch.workers=4", "parallel.strategy=fssdp", "moe.num_experts=6",
                               "data.batch_size=16", "parallel.pretend_nodes=2"])
    assert cfg.moe.num_experts == 6


# ------------------------------------------------------------------ presets and round trip


def test_tiny_preset_loads():
    cfg = load_config("tiny")
    assert cfg.model.vocab_size == 256 and cfg.parallel.strategy == "fssdp"
    assert load_config(CONFIG_DIR / "tiny.yaml") == cfg


@pytest.mark.parametrize("name", ["gpt-moe-s", "gpt-moe-l"])
def test_large_presets_load_when_present(name):
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"configs/{name}.yaml is not in the tree yet")
    cfg = load_config(path)  # strict keys/types + validation with the preset's own launch.workers
    assert cfg.model.d_model > 0 and cfg.moe.num_experts >= cfg.moe.top_k


def test_every_preset_in_configs_loads():
    presets = sorted(CONFIG_DIR.glob("*.yaml"))
    assert presets, "configs/ holds no presets"
    for p in presets:
        load_config(p)


@pytest.mark.parametrize("overrides", [[], ["parallel.fssdp.slots_per_rank=5", "sparsity.modules=[experts, mlp]",
                                            "sparsity.structure_decay=['7:8']", "train.lr=0.01"]])
def test_round_trip(overrides):
    cfg = load_config("tiny", overrides)
    assert config_from_dict(to_dict(cfg)) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


def test_config_from_dict_is_strict():
    d = to_dict(load_config("tiny"))
    d["train"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"train\.bogus"):
        config_from_dict(d)


def test_a_model_without_moe_layers_trains_dense_only():
    """moe_every beyond n_layers leaves no MoE layer: the pre-start check refuses an expert strategy on several
    ranks in one line; the config loads and plans (a dense model), and dp trains it."""
    from sparsetrain.parallel.memory_plan import memory_plan
    from sparsetrain.preflight import check_moe_layers

    cfg = load_config("tiny", ["model.moe_every=5", "parallel.strategy=fssdp"])
    assert memory_plan(cfg, 4, "cpu").max_mib > 0
    with pytest.raises(ConfigError, match="leaves no MoE layer among model.n_layers=4"):
        check_moe_layers(cfg)
    check_moe_layers(load_config("tiny", ["model.moe_every=5", "parallel.strategy=dp"]))
    check_moe_layers(load_config("tiny", ["model.moe_every=5", "launch.workers=1"]))


def test_binary_routing_trace_names_key_and_file(tmp_path):
    bad = tmp_path / "trace.bin"
    bad.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError) as ei:
        load_config("tiny", [f"moe.routing_trace={bad}"])
    msg = str(ei.value)
    assert msg.startswith(f"moe.routing_trace {bad}: not a UTF-8") and "\n" not in msg


def test_duplicate_key_in_a_yaml_file_is_refused_naming_file_key_and_line(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text("moe:\n  num_experts: 4\ntrain:\n  steps: 3\nmoe:\n  top_k: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == f"{p}: duplicate key 'moe' (line 5)"
    p.write_text("train:\n  steps: 3\n  lr: 0.1\n  steps: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"duplicate key 'steps' \(line 4\)"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^--set moe: duplicate key 'top_k' \(line 1\)$"):
        load_config("tiny", ["moe={top_k: 1, top_k: 2}"])


def test_load_yaml_allows_merge_key_overrides_and_equal_keys_in_separate_mappings() -> None:
    from sparsetrain.textio import DuplicateKeyError, load_yaml

    text = "base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  a: 5\ny: {a: 1}\n"
    assert load_yaml(text, "t.yaml") == {"base": {"a": 1, "b": 2}, "x": {"a": 5, "b": 2}, "y": {"a": 1}}
    with pytest.raises(DuplicateKeyError, match=r"^t.yaml: duplicate key 1 \(line 2\)$"):
        load_yaml("- {1: a}\n- {1: a, 1: b}\n", "t.yaml")
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: [1, 2\n", "t.yaml")


def test_offload_checkpointing_is_accepted_where_it_does_something() -> None:
    for mode in ("none", "selective"):  # selective: offload recomputes its blocks whole, not only their FFN
        load_config("tiny", ONE + [f"train.activation_checkpointing={mode}", "offload.enabled=true",
                                   "offload.checkpoint_activations=true"])
    load_config("tiny", ONE + ["train.activation_checkpointing=full", "offload.enabled=true"])  # offloads inputs


def test_fssdp_refuses_cached_expert_masks_on_several_ranks() -> None:
    """A gathered copy would mask its expert from later weights than the owner's cached mask: refused in one line
    naming both keys; one rank, EP, or masks of attention alone stay allowed."""
    base = ["sparsity.enabled=true", "sparsity.refresh_every=4"]
    with pytest.raises(ConfigError, match=r"sparsity.refresh_every=4 with parallel.strategy=fssdp"):
        load_config("tiny", [*base, "parallel.strategy=fssdp", "launch.workers=2"])
    for ok in (["parallel.strategy=fssdp", "launch.workers=1"], ["parallel.strategy=ep", "launch.workers=2"],
               ["parallel.strategy=fssdp", "launch.workers=2", "sparsity.modules=[attn]"]):
        assert load_config("tiny", [*base, *ok]).sparsity.refresh_every == 4


def test_counters_fit_in_64_bits_and_out_dir_is_not_empty():
    """A 23-digit train.steps was accepted and a run started that could never end; an empty train.out_dir trained
    into the current directory."""
    with pytest.raises(ConfigError, match="train.steps: 99999999999999999999999 does not fit in 64 bits"):
        load_config("tiny", ["train.steps=99999999999999999999999"])
    with pytest.raises(ConfigError, match="train.out_dir is empty"):
        load_config("tiny", ['train.out_dir=""'])
    with pytest.raises(ConfigError, match="train.out_dir is empty"):
        load_config("tiny", ['train.out_dir="  "'])


@pytest.mark.parametrize(("override", "message"), [
    ("sparsity.modules=[bogus]", r"^sparsity\.modules has \['bogus'\]; allowed: experts, mlp, attn$"),
    ("sparsity.structure_decay=['7:9']", r"^sparsity: structure stage '7:9': m=9 must divide"),
    ("sparsity.structure_decay=['4:8']", r"^sparsity\.structure_decay is set but structure_decay_every is 0$"),
])
def test_the_whole_nm_recipe_is_a_config_check(override: str, message: str) -> None:
    """The N:M recipe fails at load (exit 2 in every command, `sparsetrain config` too), not at trainer start-up."""
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", ["sparsity.enabled=true", override])
    assert load_config("tiny", [override]).sparsity.enabled is False  # checked only when N:M training is on
