"""The `sparsetrain` command line, run as a subprocess: config errors, `config`, train -> eval -> generate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parent.parent
TINY = ["launch.workers=1", "parallel.strategy=none", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
        "model.seq_len=16", "moe.num_experts=4", "moe.d_ffn=32", "data.batch_size=4", "data.eval_batches=1",
        "train.eval_every=0", "train.log_every=1", "train.warmup_steps=1", "train.progress=false",
        "train.device=cpu", "checkpoint.save_final=true"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `sparsetrain <args>` (as `python -m sparsetrain.cli`) from the repo root."""
    env = {**os.environ, "SPARSETRAIN_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sparsetrain.cli", *args], cwd=ROOT, env=env,
                          check=False, capture_output=True, text=True, timeout=timeout)


def _sets(items: list[str]) -> list[str]:
    out: list[str] = []
    for it in items:
        out += ["--set", it]
    return out


def test_unknown_key_is_one_line_error():
    r = cli("train", "--config", "configs/tiny.yaml", "--set", "model.bogus=1")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "model.bogus" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


def test_config_prints_resolved_yaml_with_override():
    r = cli("config", "--config", "tiny", "--set", "train.steps=7", "--set", "moe.top_k=1")
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert data["train"]["steps"] == 7 and data["moe"]["top_k"] == 1
    assert data["model"]["vocab_size"] == 256  # the rest comes from the preset


def test_train_then_eval_and_generate(tmp_path):
    out = tmp_path / "run"
    sets = _sets(TINY)
    r = cli("train", "--config", "configs/tiny.yaml", *sets, "--set", "train.steps=3", "--set", f"train.out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [0, 1, 2]
    ck = out / "checkpoints" / "step_00000002"
    assert (ck / ".metadata").exists()

    r = cli("eval", "--config", "tiny", *sets, "--checkpoint", str(ck))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["checkpoint"] == str(ck) and 0 < res["val_loss"] < 7

    # generate finds the latest checkpoint under <out_dir>/checkpoints by itself
    r = cli("generate", "--config", "tiny", *sets, "--set", f"train.out_dir={out}", "--tokens", "12",
            "--prompt", "def ")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("def ")


def test_generate_binary_prompt_file_is_one_line_error(tmp_path):
    bad = tmp_path / "prompt.bin"
    bad.write_bytes(bytes(range(256)))
    r = cli("generate", "--config", "tiny", *_sets(TINY), "--set", f"train.out_dir={tmp_path / 'run'}",
            "--prompt-file", str(bad))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --prompt-file {bad}: not UTF-8 text"), r.stderr


def test_binary_tokenizer_file_is_one_line_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(bytes(range(256)))
    r = cli("train", "--config", "tiny", *_sets(TINY), "--set", f"data.tokenizer={bad}",
            "--set", f"train.out_dir={tmp_path / 'run'}")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"data.tokenizer='{bad}': not a UTF-8 tokenizer JSON" in lines[0], r.stderr


def test_eval_without_checkpoint_is_one_line_error(tmp_path):
    r = cli("eval", "--config", "tiny", *_sets(TINY), "--checkpoint", str(tmp_path / "none"))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(tmp_path / "none") in lines[0], r.stderr
