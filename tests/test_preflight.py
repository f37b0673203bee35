"""Every bad input refused before any process starts, with one line and no traceback (issue 11's probes)."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsetrain.cli import app
from sparsetrain.config import ConfigError, load_config
from sparsetrain.data.errors import DataError
from sparsetrain.preflight import preflight

pytestmark = pytest.mark.unit

BASE = ["launch.workers=1", "parallel.strategy=none", "train.device=cpu"]


@pytest.mark.parametrize(("override", "message"), [
    ("checkpoint.keep=-1", "checkpoint.keep must be >= 0"),
    ("checkpoint.every=-5", "checkpoint.every must be >= 0"),
    ("launch.torch_threads=0", "launch.torch_threads must be >= 1"),
    ("launch.cpus_per_worker=0", "launch.cpus_per_worker must be >= 1"),
    ("data.eval_batches=0", "data.eval_batches must be >= 1"),
    ("model.vocab_size=0", "model.vocab_size must be >= 1"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps must be >= 0"),
    ("train.on_nan=ignore", "train.on_nan='ignore'; allowed: error, skip, rollback"),
])
def test_counters_refused_at_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [*BASE, override])


def test_planner_name_checked_before_start() -> None:
    with pytest.raises(ConfigError, match="parallel.fssdp.planner='bogus'; allowed: .*hecate"):
        preflight(load_config("tiny", [*BASE, "parallel.fssdp.planner=bogus"]))


def _corpus(tmp_path: Path, name: str, data: bytes | None) -> str:
    d = tmp_path / name
    d.mkdir()
    if data is not None:
        (d / "train.bin").write_bytes(data)
    return str(d)


@pytest.mark.parametrize(("data", "message"), [
    (None, "missing .*train.bin"),
    (b"", "is empty"),
    (b"abc", "not a multiple of 2"),
    (b"abcd", r"need a shard of more than model.seq_len \+ 1"),
])
def test_data_path_checks(tmp_path: Path, data: bytes | None, message: str) -> None:
    cfg = load_config("tiny", [*BASE, f"data.corpus={_corpus(tmp_path, 'c', data)}"])
    with pytest.raises(DataError, match=message):
        preflight(cfg)


def test_missing_data_dir_and_vocab_below_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="directory not found"):
        preflight(load_config("tiny", [*BASE, f"data.corpus={tmp_path}/none"]))
    with pytest.raises(DataError, match=r"model.vocab_size=10 is smaller than the vocabulary of data.tokenizer"):
        preflight(load_config("tiny", [*BASE, "model.vocab_size=10"]))


@pytest.mark.parametrize("override", ["model.seq_len=100000000", "model.d_model=1000000000"])
def test_memory_that_cannot_fit_is_refused_with_plan_numbers(override: str) -> None:
    with pytest.raises(ConfigError, match=r"does not fit: the plan needs [\d.]+ GiB per rank \(params .*activations"):
        preflight(load_config("tiny", [*BASE, override]))


def test_remote_cluster_skips_local_data_and_memory(tmp_path: Path) -> None:
    preflight(load_config("tiny", [*BASE, "launch.address=auto", f"data.corpus={tmp_path}/none"]))


def test_non_utf8_config_and_set_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model:\n  d_model: 64 \xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xff"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="--set train.out_dir: the value is not valid UTF-8"):
        load_config("tiny", [b"train.out_dir=/tmp/\xff".decode("utf-8", "surrogateescape")])


@pytest.mark.parametrize(("args", "code"), [
    (["train", "--set", "model.vocab_size=10"], 1),  # pre-start checks: 1
    (["train", "--set", "parallel.fssdp.planner=bogus"], 1),
    (["train", "--set", "model.seq_len=100000000"], 1),
    (["eval", "--set", "data.eval_batches=0"], 2),  # config load: 2
    (["train", "--set", "launch.cpus_per_worker=0"], 2),
    (["plan", "--set", "parallel.fssdp.planner=bogus"], 2),  # plan: the planner registry, as train does
    (["plan", "--json", "--set", "parallel.strategy=ep", "--set", "parallel.fssdp.planner=bogus"], 2),
    (["sim", "predict", "-c", "gpt-moe-s", "--gpus", "0"], 2),
    (["sim", "predict", "-c", "gpt-moe-s", "--gpus", ","], 2),
    (["generate", "--temperature", "-1"], 2),
    (["generate", "--temperature", "nan"], 2),
    (["train", "--set", "sparsity.enabled=true", "--set", "sparsity.modules=[mlp]"], 1),  # tiny: every FFN is MoE
    (["plan", "--set", "sparsity.enabled=true", "--set", "sparsity.modules=[mlp]"], 2),
    (["train", "--set", "train.device=cpu", "--set", "sparsity.enabled=true", "--set", "sparsity.kernel=cuda_2_4"], 1),
])
def test_cli_one_line_no_traceback(args: list[str], code: int) -> None:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output


def test_cuda_device_without_a_gpu_is_refused_before_start(monkeypatch) -> None:
    from sparsetrain import preflight as pf

    monkeypatch.setattr(pf, "visible_gpus", lambda: 0)
    with pytest.raises(ConfigError, match="train.device=cuda but this machine has no CUDA GPU"):
        pf.preflight(load_config("tiny", ["train.device=cuda"]))
    res = CliRunner().invoke(app, ["train", "--set", "train.device=cuda", "--set", "train.out_dir=/tmp/never"])
    assert res.exit_code == 1 and res.output.startswith("error: train.device=cuda"), res.output  # one line, no start
    monkeypatch.setattr(pf, "visible_gpus", lambda: 8)
    pf.check_device(load_config("tiny", ["train.device=cuda"]))  # a GPU machine passes


def test_gpus_per_worker_on_a_machine_without_them_is_refused_inline(monkeypatch) -> None:
    from sparsetrain import preflight as pf

    monkeypatch.setattr(pf, "visible_gpus", lambda: 0)
    one = ["launch.workers=1", "launch.gpus_per_worker=1"]
    with pytest.raises(ConfigError, match=r"launch.gpus_per_worker=1 but this machine has 0 CUDA GPU\(s\)"):
        pf.check_device(load_config("tiny", one))
    pf.check_device(load_config("tiny", [*one, "launch.address=10.0.0.1:6379"]))  # the cluster's GPUs, not ours
    monkeypatch.setattr(pf, "visible_gpus", lambda: 1)
    pf.check_device(load_config("tiny", one))


def test_unquoted_nm_string_gets_a_quoting_hint() -> None:
    with pytest.raises(ConfigError, match=r"sparsity.structure_decay\[0\]: expected str, got int 428.*write '7:8'"):
        load_config("tiny", ["sparsity.structure_decay=[7:8,4:8]"])
    assert load_config("tiny", ["sparsity.structure_decay=['7:8','4:8']"]).sparsity.structure_decay == ["7:8", "4:8"]


def test_sparse_kernel_the_device_cannot_run_is_refused_before_start(monkeypatch) -> None:
    """sparsity.kernel=triton on CPU without the interpreter, or cuda_2_4 off CUDA: one line before any rank starts
    (it used to fail ~100 lines deep in the first sparse GEMM)."""
    from sparsetrain import preflight as pf

    monkeypatch.setattr(pf, "visible_gpus", lambda: 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sp = ["sparsity.enabled=true", "sparsity.modules=[experts,attn]"]
    with pytest.raises(ConfigError, match=r"^sparsity.kernel=triton needs a CUDA device or TRITON_INTERPRET=1 "
                                          r"\(train.device=cpu\)$"):
        pf.check_sparsity_kernel(load_config("tiny", [*BASE, *sp, "sparsity.kernel=triton"]))
    with pytest.raises(ConfigError, match="sparsity.kernel=triton needs a CUDA device .*no CUDA GPU on this machine"):
        pf.check_sparsity_kernel(load_config("tiny", [*sp, "train.device=auto", "sparsity.kernel=triton"]))
    with pytest.raises(ConfigError, match=r"sparsity.kernel=cuda_2_4 needs train.device=cuda \(train.device=cpu\)"):
        pf.preflight(load_config("tiny", [*BASE, *sp, "sparsity.kernel=cuda_2_4"]), data=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pf.check_sparsity_kernel(load_config("tiny", [*BASE, *sp, "sparsity.kernel=triton"]))  # the interpreter runs it
    monkeypatch.setattr(pf, "visible_gpus", lambda: 8)
    with pytest.raises(ConfigError, match="sparsity.kernel=cuda_2_4 runs 2:4 only, got N:M stages 2:8"):
        pf.check_sparsity_kernel(load_config("tiny", [*sp, "train.device=cuda", "sparsity.m=8",
                                                      "sparsity.kernel=cuda_2_4"]))
    pf.check_sparsity_kernel(load_config("tiny", [*sp, "train.device=cuda", "sparsity.kernel=cuda_2_4"]))


def test_transposable_large_m_passes_the_sparsity_check() -> None:
    """transposable masks with m > 4 on a meta-built model: no NotImplementedError from a data-dependent op."""
    from sparsetrain.preflight import check_sparsity

    check_sparsity(load_config("tiny", [*BASE, "sparsity.enabled=true", "sparsity.modules=[attn]",
                                        "sparsity.transposable=true", "sparsity.m=8"]))


def test_a_bad_fault_plan_is_one_line_before_start(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SPARSETRAIN_FAULTS", "bogus@x:0")
    res = CliRunner().invoke(app, ["train", "--set", "launch.workers=1", "--set", f"train.out_dir={tmp_path / 'r'}"])
    assert res.exit_code == 1 and res.output == "error: SPARSETRAIN_FAULTS: 'bogus@x:0' is not mode@step:rank\n"
    assert not (tmp_path / "r").exists()
