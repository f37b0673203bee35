"""Calibration recovers known constants from synthetic per-rank timings; the CLI writes a loadable cluster."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import yaml

from sparsetrain.config import load_config, to_dict
from sparsetrain.sim.calibrate import _local_params, calibrate, load_run
from sparsetrain.sim.cluster import load_cluster
from sparsetrain.sim.shape import setup_from_config

pytestmark = pytest.mark.unit
TRUE = {"flops": 2.0e10, "overhead": 1.5e-3, "latency": 2.0e-4, "bandwidth": 5.0e8, "ratio": 1.8,
        "per_param": 3.0e-8}


def _fake_run(d, world: int, batch: int, a2a_mb: float, noise: float, rng: random.Random, strategy: str = "ep",
              per_slot: float = 0.0, sprs_mb: float = 0.0) -> None:
    """A run's files with timings from TRUE; `per_slot`: local all-to-all work per slot permutation; `sprs_mb`: the
    busiest rank's spRS bytes (FSSDP), timed at TRUE's bandwidth."""
    cfg = load_config("tiny", [f"launch.workers={world}", f"parallel.strategy={strategy}", f"data.batch_size={batch}",
                               "launch.backend=torchrun"])
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    s = setup_from_config(cfg)
    run = type("R", (), {"setup": s, "world": world, "strategy": strategy})()
    params = _local_params(run)
    tokens_rank = s.tokens / world
    recs = []
    for step in range(6):
        jitter = lambda: 1 + noise * (2 * rng.random() - 1)
        slots = [tokens_rank * s.top_k * s.n_moe * (1 + 0.3 * (r - (world - 1) / 2) / world) * (1 + 0.1 * step)
                 for r in range(world)]
        ranks = {k: [] for k in ("attention_cpu_ms", "experts_cpu_ms", "dispatch_ms", "combine_ms", "optimizer_ms",
                                 "tokens", "experts_ms", "attention_ms")}
        msgs = s.n_moe * 3 * (world - 1)
        comm = msgs * TRUE["latency"] + a2a_mb * 2**20 / world / 2 / TRUE["bandwidth"] + \
            per_slot * 2 * tokens_rank * s.top_k * s.n_moe
        fwd_compute = 0.0
        for r in range(world):
            attn = s.n_layers * tokens_rank * s.attn_fwd_flops() / TRUE["flops"] + s.n_layers * TRUE["overhead"]
            exp = slots[r] * s.expert_fwd_flops() / TRUE["flops"] + s.n_moe * TRUE["overhead"]
            fwd_compute += (attn + exp) / world
            ranks["attention_cpu_ms"].append(1000 * attn * jitter())
            ranks["experts_cpu_ms"].append(1000 * exp * jitter())
            ranks["dispatch_ms"].append(1000 * comm * 0.4 * jitter())
            ranks["combine_ms"].append(1000 * comm * 0.6 * jitter())
            ranks["optimizer_ms"].append(1000 * params * TRUE["per_param"] * jitter())
            ranks["tokens"].append(slots[r])
            ranks["experts_ms"].append(1000 * exp)
            ranks["attention_ms"].append(1000 * attn)
            if sprs_mb:
                sent = sprs_mb * (1 if r == 0 else 0.5)  # rank 0 is the busiest sender
                ranks.setdefault("sprs_sent_MB", []).append(sent)
                ranks.setdefault("sprs_ms", []).append(1000 * sprs_mb * 2**20 / TRUE["bandwidth"] * (1 + 0.2 * r))
        recs.append({"step": step, "loss": 5.0, "fwd_s": fwd_compute + comm,
                     "bwd_s": TRUE["ratio"] * fwd_compute + comm, "a2a_MB": a2a_mb,
                     "tokens_per_s": s.tokens / 0.5, "ranks": ranks})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _runs(tmp_path, noise: float) -> list:
    rng = random.Random(0)
    dirs = []
    for i, (world, batch, mb) in enumerate([(2, 8, 0.5), (2, 16, 1.0), (4, 16, 3.0), (4, 32, 6.0), (2, 32, 2.5)]):
        d = tmp_path / f"run{i}"
        _fake_run(d, world, batch, mb, noise, rng)
        dirs.append(d)
    return dirs


def test_recovers_known_constants(tmp_path):
    fitted, diag = calibrate(_runs(tmp_path, 0.0), load_cluster("cpu-2core"), "fit")
    assert fitted.achievable_flops == pytest.approx(TRUE["flops"], rel=1e-6)
    assert fitted.layer_overhead_s == pytest.approx(TRUE["overhead"], rel=1e-6)
    assert fitted.intra_node_latency_s == pytest.approx(TRUE["latency"], rel=1e-6)
    assert fitted.intra_node_Bps == pytest.approx(TRUE["bandwidth"], rel=1e-6)
    assert fitted.bwd_fwd_ratio == pytest.approx(TRUE["ratio"], rel=1e-6)
    assert fitted.optimizer_s_per_param == pytest.approx(TRUE["per_param"], rel=1e-6)
    assert diag["link_samples"] == 25  # 5 runs x 5 records after the warm-up


def test_bandwidth_from_sprs_rows_and_local_dispatch_work_per_slot(tmp_path):
    """With FSSDP runs whose spRS ran after backward, the bandwidth comes from those bulk rows and the all-to-all
    time beyond its bytes splits into latency and per-slot local work (the fit without them folds that work into
    a bandwidth 4x too low here)."""
    rng, per_slot = random.Random(0), 2e-7
    dirs = []
    for i, (world, batch, mb, strategy, sprs) in enumerate([(2, 8, 0.5, "ep", 0), (2, 32, 2.5, "ep", 0),
                                                            (4, 16, 3.0, "fssdp", 4.0), (2, 16, 1.0, "fssdp", 2.0)]):
        dirs.append(tmp_path / f"run{i}")
        _fake_run(dirs[-1], world, batch, mb, 0.0, rng, strategy, per_slot, sprs)
    fitted, diag = calibrate(dirs, load_cluster("cpu-2core"), "fit")
    assert diag["p2p_samples"] == 10 and diag["link_samples"] == 20
    assert fitted.intra_node_Bps == pytest.approx(TRUE["bandwidth"], rel=1e-6)
    assert fitted.dispatch_s_per_slot == pytest.approx(per_slot, rel=1e-6)
    assert fitted.intra_node_latency_s == pytest.approx(TRUE["latency"], rel=1e-6)
    ep_only, diag = calibrate(dirs[:2], load_cluster("cpu-2core"), "fit")
    assert diag["p2p_samples"] == 0 and ep_only.dispatch_s_per_slot == 0.0
    assert ep_only.intra_node_Bps < TRUE["bandwidth"] / 4


def test_noisy_timings_within_a_few_percent(tmp_path):
    fitted, _ = calibrate(_runs(tmp_path, 0.03), load_cluster("cpu-2core"), "fit")
    assert fitted.achievable_flops == pytest.approx(TRUE["flops"], rel=0.05)
    assert fitted.intra_node_Bps == pytest.approx(TRUE["bandwidth"], rel=0.1)
    assert fitted.intra_node_latency_s == pytest.approx(TRUE["latency"], rel=0.1)


def test_cli_writes_a_loadable_cluster_and_rejects_bad_dirs(tmp_path):
    dirs = _runs(tmp_path, 0.0)
    out = tmp_path / "fit.yaml"
    proc = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "sim", "calibrate", *map(str, dirs),
                           "--name", "host", "--out", str(out)], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    c = load_cluster(out)
    assert c.name == "host" and c.device == "cpu" and c.achievable_flops == pytest.approx(TRUE["flops"], rel=1e-6)
    proc = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "sim", "calibrate", str(tmp_path)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs config.yaml and metrics.jsonl" in proc.stderr
    with pytest.raises(ValueError, match="no logged records"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.yaml").write_text((dirs[0] / "config.yaml").read_text())
        (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
        load_run(tmp_path / "empty")


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    import torch

    from sparsetrain.sim.calibrate import median

    assert median([0.048, 0.063]) == pytest.approx(0.0555)  # two runs: torch.median gave 0.048
    assert median([3.0, 1.0, 2.0]) == 2.0 and median(torch.tensor([4.0, 1.0, 3.0, 2.0])) == 2.5


def test_a_run_config_with_a_duplicate_key_is_refused(tmp_path) -> None:
    d = tmp_path / "run"
    _fake_run(d, 2, 8, 0.5, 0.0, random.Random(0))
    text = (d / "config.yaml").read_text()
    (d / "config.yaml").write_text(text + "model:\n  d_model: 64\n")
    line = len(text.splitlines()) + 1
    with pytest.raises(ValueError, match=rf"^{d / 'config.yaml'}: duplicate key 'model' \(line {line}\)$"):
        load_run(d)
