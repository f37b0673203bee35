"""Bad simulator inputs are refused in one line before any work (cluster files, CLI options, run and workload
files), and the models match the runtime where a hostile reading found them apart (dp under fsdp2, CPU hosts)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparsetrain.sim.cluster import CLUSTER_DIR, load_cluster
from sparsetrain.sim.predict import predict
from sparsetrain.sim.shape import SimSetup
from sparsetrain.sim.workload import replay_loads

pytestmark = pytest.mark.unit
S = SimSetup(d_model=64, n_layers=2, n_moe=2, seq_len=32, vocab_size=256, num_experts=8, top_k=2, d_ffn=128,
             d_ffn_dense=256, batch_size=16, dense_params=50_000)


def _cluster_file(tmp_path: Path, **change) -> Path:
    data = yaml.safe_load((CLUSTER_DIR / "h100-sxm-8x.yaml").read_text())
    data.update(change)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(("change", "message"), [
    ({"intra_node_latency_s": float("nan")}, "intra_node_latency_s must be a finite number"),
    ({"bwd_fwd_ratio": -1.0}, "bwd_fwd_ratio must be > 0"),
    ({"peak_flops": 1e12}, "exceeds peak_flops"),
    ({"cpu_share": 5.0}, "cpu_share is a share of one core"),
    ({"cores": 2.5}, "cores must be a whole number"),
    ({"hbm_bytes": -5}, "hbm_bytes must be >= 0"),
    ({"gpus_per_node": 2.5}, "gpus_per_node must be a whole number"),
    ({"peak_flops": "abc"}, "peak_flops must be a number, got 'abc'"),
])
def test_cluster_values_that_make_no_sense_are_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_cluster(_cluster_file(tmp_path, **change))


def test_cluster_files_that_are_not_mappings_are_refused(tmp_path):
    for text, message in (("a: [", "not a readable cluster YAML"), ("5", "mapping of keys"),
                          ("hello", "mapping of keys")):
        (tmp_path / "x.yaml").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_cluster(tmp_path / "x.yaml")
    with pytest.raises(ValueError, match="not a readable cluster YAML"):
        load_cluster(tmp_path)  # a directory
    assert load_cluster(_cluster_file(tmp_path, gpus_per_node="8")).gpus_per_node == 8  # quoted numbers read


def _sim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsetrain.cli", "sim", "predict", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def test_predict_cli_refuses_bad_options_in_one_line(tmp_path):
    cases = [(["--gpus", "8", "--batch-per-gpu", "-4"], "--batch-per-gpu must be >= 1"),
             (["--gpus", "8", "--variants", ","], "--variants names no variant"),
             (["--gpus", "8", "--variants", "ep-hecate"], "a planner goes with fssdp only"),
             (["--gpus", "2", "--variants", "ep", "--set", "parallel.ep_size=4"], "ep_size=4 does not divide 2 GPUs"),
             (["--gpus", "16384", "--variants", "ep"], "at most 8192 GPUs"),
             (["--gpus", "8", "--out", str(tmp_path / "f" / "x")], "--out"),
             (["--gpus", "8,abc"], "--gpus takes comma-separated GPU counts, got 'abc'")]
    (tmp_path / "f").write_text("a file, not a directory")
    for args, message in cases:
        proc = _sim(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "runs").exists()  # refused before writing anything


def test_predict_marks_rows_that_do_not_fit_the_gpu_memory(tmp_path):
    proc = _sim("-c", "gpt-moe-s", "--gpus", "512", "--variants", "ep", "--set", "moe.router_skew=1.2",
                "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "DO NOT FIT in 80 GiB per GPU (hbm_bytes): 512 ep" in proc.stdout


def test_dp_shards_experts_under_fsdp2_as_the_runtime():
    shares = torch.full((2, 8), 1 / 8, dtype=torch.float64)
    c = load_cluster("h100-sxm-8x")
    fsdp = [predict(S.with_(strategy="dp", batch_size=2 * w), c, w, shares).mem_per_rank_gib for w in (2, 8)]
    ddp = [predict(S.with_(strategy="dp", dense="ddp", batch_size=2 * w), c, w, shares).mem_per_rank_gib
           for w in (2, 8)]  # 2 sequences per rank: the same activations per rank
    assert fsdp[1] < fsdp[0] and fsdp[1] < ddp[1]  # sharded state shrinks with the world; replicated does not
    assert ddp[0] == pytest.approx(ddp[1])


def test_cpu_host_ranks_share_its_cores_at_any_count():
    """cpu-2core is one host: 16 or 32 local ranks split the same 2 cores (not 'nodes' of 8 with cores each)."""
    c = load_cluster("cpu-2core")
    shares = torch.full((2, 8), 1 / 8, dtype=torch.float64)
    steps = [predict(S.with_(strategy="ep", batch_size=32), c, w, shares).step_time_s for w in (8, 16, 32)]
    assert steps == sorted(steps)  # same global batch, more ranks on 2 cores: never faster


def test_workload_and_run_files_with_torn_or_odd_lines(tmp_path):
    good = {"step": 0, "counts": [[3, 1], [2, 2]]}
    p = tmp_path / "expert_loads.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "step": 1}) + "\n" + '{"step": 2, "cou')
    shares = replay_loads(p, 2, 2)  # the torn last line is skipped
    assert torch.allclose(shares[0], torch.tensor([0.75, 0.25], dtype=torch.float64))
    p.write_text(json.dumps({"step": 0, "counts": [[0, 0], [2, 2]]}) + "\n")
    with pytest.raises(ValueError, match="positive total"):
        replay_loads(p, 2, 2)
    p.write_text(json.dumps({"step": 0}) + "\n")
    with pytest.raises(ValueError, match="no steps with per-layer expert counts"):
        replay_loads(p, 2, 2)


def test_calibrate_skips_a_torn_metrics_line_and_names_missing_fields(tmp_path):
    from sparsetrain.config import load_config, to_dict
    from sparsetrain.sim.calibrate import load_run

    d = tmp_path / "run"
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config("tiny", ["launch.workers=1"]))))
    ranks = {k: [1.0] for k in ("attention_ms", "experts_ms", "attention_cpu_ms", "experts_cpu_ms", "optimizer_ms",
                                "tokens", "dispatch_ms", "combine_ms")}
    recs = [json.dumps({"step": i, "loss": 1.0, "ranks": ranks}) for i in range(3)]
    (d / "metrics.jsonl").write_text("\n".join(recs) + '\n{"step": 3, "loss": 1.0, "ran')
    assert len(load_run(d).records) == 2  # first is warm-up, the torn one skipped
    del ranks["attention_cpu_ms"]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "ranks": ranks}) for i in range(3)))
    with pytest.raises(ValueError, match="records lack per-rank attention_cpu_ms"):
        load_run(d)


def test_duplicate_key_in_a_cluster_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("gpus_per_node: 8\ncores: 2\ngpus_per_node: 4\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^" + str(p) + r": duplicate key 'gpus_per_node' \(line 3\)$"):
        load_cluster(p)


def test_predict_checks_ep_size_against_each_predicted_world_not_launch_workers(tmp_path: Path) -> None:
    ok = _sim("--gpus", "8,16", "--variants", "ep", "--set", "parallel.ep_size=8", "--set", "launch.workers=4",
              "--out", str(tmp_path / "o"), cwd=tmp_path)  # 8 does not divide launch.workers=4: not what is predicted
    assert ok.returncode == 0, ok.stderr
    bad = _sim("--gpus", "8,12", "--variants", "ep", "--set", "parallel.ep_size=8", "--out", str(tmp_path / "b"),
               cwd=tmp_path)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert "parallel.ep_size=8 does not divide 12 GPUs (--gpus 8,12)" in lines[0] and not (tmp_path / "b").exists()


def test_predict_names_rows_the_runtime_would_refuse(tmp_path: Path) -> None:
    """A world the runtime refuses (tiny pretends 2 nodes: 3 ranks do not split) is predicted but marked, with the
    runtime's reason (the plan column was a bare '-'); a repeated count is one row."""
    proc = _sim("--gpus", "3,4,4", "--variants", "ep", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "NOT RUNNABLE 3 ep: the runtime refuses it (" in proc.stdout and "NOT RUNNABLE 4" not in proc.stdout
    assert "does not divide the world size 3" in proc.stdout.split("NOT RUNNABLE 3 ep")[1].splitlines()[0]
    rows = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert [r["gpus"] for r in rows] == [3, 4] and rows[0]["mem_plan_gib"] is None and rows[1]["mem_plan_gib"] > 0
