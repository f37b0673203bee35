"""The benchmarks' shared measurement helpers: interleaved repetitions, step clocks, collective byte counts,
and how moe_strategies.py turns repetitions into a table row."""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks.measure import CollectiveCounter, StepClock, per_run_ratios, percentile, rotations, run_interleaved
from tests.dist_utils import run_distributed


def test_rotations_interleave_every_variant_once_per_repetition():
    order = rotations(["a", "b", "c"], 4)
    assert order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert rotations(["a"], 2) == [["a"], ["a"]] and rotations([], 3) == []


def test_run_interleaved_runs_in_rotation_order_and_groups_results():
    calls: list[str] = []
    logged: list[tuple[int, str, str]] = []
    res = run_interleaved(["ep", "fssdp"], 3, lambda v: (calls.append(v), f"{v}{len(calls)}")[1],
                          lambda rep, v, r: logged.append((rep, v, r)))
    assert calls == ["ep", "fssdp", "fssdp", "ep", "ep", "fssdp"]
    assert res == {"ep": ["ep1", "ep4", "ep5"], "fssdp": ["fssdp2", "fssdp3", "fssdp6"]}
    assert [(rep, v) for rep, v, _ in logged] == [(0, "ep"), (0, "fssdp"), (1, "fssdp"), (1, "ep"), (2, "ep"),
                                                  (2, "fssdp")]


def test_per_run_ratios_and_percentile():
    assert per_run_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="2 values vs 1"):
        per_run_ratios([1.0, 2.0], [1.0])
    vals = [float(i) for i in range(1, 11)]
    assert percentile(vals, 0.9) == 9.0 and percentile(vals, 1.0) == 10.0 and percentile([3.0], 0.9) == 3.0
    assert percentile([], 0.5) != percentile([], 0.5)  # nan


def _clock_and_counter_body(rank: int, world: int) -> dict:
    import torch.distributed as dist

    counter = CollectiveCounter()
    counter.install()
    clock = StepClock()
    with clock.step(timed=False):  # untimed steps leave no sample
        pass
    with clock.step():
        time.sleep(0.3)  # waiting: wall time, almost no CPU time
    with clock.step():
        c0 = time.process_time()
        while time.process_time() - c0 < 0.2:  # working: 0.2 s of CPU, however long the loaded machine takes
            pass
    counter.enabled = True
    x = torch.ones(1000)
    dist.all_reduce(tensor=x)  # keyword tensors, as deepspeed.comm passes them
    out = torch.empty(1000)
    dist.all_to_all_single(output=out, input=x)
    dist.all_to_all_single(out, x)
    dist.all_gather_single(torch.empty(2000), x)  # FSDP2's all-gather in torch 2.13
    counter.enabled = False
    calls, nbytes = counter.pop()
    return {"wall": clock.wall, "cpu": clock.cpu, "calls": calls, "bytes": nbytes}


@pytest.mark.distributed
def test_step_clock_separates_work_from_waiting_and_counter_sees_keyword_tensors():
    for r in run_distributed(_clock_and_counter_body, 2, timeout=300):
        assert len(r["wall"]) == len(r["cpu"]) == 2
        assert r["wall"][0] >= 0.3 and r["cpu"][0] < 0.15, r  # a sleeping step costs no CPU
        assert 0.2 <= r["cpu"][1] < 0.3 and r["wall"][1] >= 0.2, r
        assert r["calls"] == {"all_reduce": 1, "all_to_all_single": 2, "all_gather_single": 1}, r
        assert r["bytes"] == {"all_reduce": 4000, "all_to_all_single": 8000, "all_gather_single": 8000}, r


def _run(variant: str, step_ms: list[float], cpu_ms: float, loss: float = 2.5, a2a: float = 1.0) -> dict:
    return {"world": 2, "workload": "balanced", "variant": variant, "step_ms": step_ms[len(step_ms) // 2],
            "p90_ms": max(step_ms), "max_ms": max(step_ms), "cpu_ms": cpu_ms, "steps_ms": step_ms, "tok_s": 1000.0,
            "busy_max_mean": 1.1, "busy_max_ms": 50.0, "slots_max_mean": 1.0, "load_max_mean": 1.2, "top1_share": 0.1,
            "spag_mib": 0.0, "reshard_mib": 0.0, "a2a_mib": a2a, "peak_tensor_mib": 100.0, "rss_mib": 900.0,
            "loss": loss, "dropped": 0,
            "reshard_steps": []}


def test_combine_takes_medians_over_repetitions_and_pools_steps_for_the_tail():
    from benchmarks.moe_strategies import HEADER, combine, row

    ep = combine([_run("ep", [100, 110, 120], 50), _run("ep", [200, 210, 220], 60), _run("ep", [90, 100, 400], 55)])
    assert ep["step_ms"] == 110 and ep["cpu_ms"] == 55 and ep["max_ms"] == 400 and ep["repeats"] == 3
    assert ep["p90_ms"] == 220 and ep["run_step_ms"] == [110, 210, 100] and ep["same_result"]
    ds = combine([_run("deepspeed_moe", [220], 100, a2a=3.25), _run("deepspeed_moe", [420], 120, a2a=3.25),
                  _run("deepspeed_moe", [100], 110, loss=2.6, a2a=3.25)])
    assert not ds["same_result"]  # one repetition ended on another loss
    cells = [c.strip() for c in row(ds, ep).strip("|").split("|")]
    names = [c.strip() for c in HEADER.strip("|").split("|")]
    assert len(cells) == len(names)
    got = dict(zip(names, cells))
    assert got["vs ep"] == "2.00" and got["per-run vs ep"] == "2.00, 2.00, 1.00"
    assert got["CPU ms/step/rank"] == "110.0" and got["CPU vs ep"] == "2.00"
    assert got["a2a MiB/step"] == "3.25"  # DeepSpeed-MoE's all-to-all is counted, not n/c


def test_balance_bound_takes_the_busiest_ranks_excess_expert_time_off_each_static_ep_row():
    from benchmarks.moe_strategies import balance_bound

    ep = {**_run("ep", [500], 400), "workload": "drift", "step_ms": 500.0, "busy_max_ms": 330.0,
          "busy_max_mean": 1.1}
    fssdp = {**ep, "variant": "fssdp-lpt", "busy_max_mean": 1.0}  # not a static EP row: no bound printed
    line = balance_bound([ep, fssdp])
    assert line == "<!-- 2 ranks, drift: balancing expert compute alone would give ep 470.0 ms = 0.94x its step -->"
    assert balance_bound([fssdp]) == ""


def test_imbalance_penalty_divides_each_variants_step_by_its_own_on_balanced_routing():
    from benchmarks.moe_strategies import imbalance_penalty

    def r(wl: str, v: str, ms: float) -> dict:
        return {**_run(v, [ms], ms), "workload": wl, "step_ms": ms}

    rows = [r("drift", "ep-ddp", 440.0), r("drift", "fssdp-lpt-ddp", 400.0), r("drift", "deepspeed_moe", 900.0),
            r("balanced", "ep-ddp", 385.0), r("balanced", "fssdp-lpt-ddp", 400.0), r("uniform", "ep", 300.0)]
    lines = imbalance_penalty(rows)
    assert lines == [("<!-- 2 ranks, drift: step over the same variant's on balanced routing: ep-ddp 1.14, "
                      "fssdp-lpt-ddp 1.00; a variant balancing everything at ep-ddp's balanced cost would be "
                      "0.88x ep-ddp here -->")]  # uniform: ep did not run on balanced routing; no line
    assert imbalance_penalty([r("drift", "ep", 1.0)]) == []  # no balanced rows: nothing to divide by


def test_expert_busy_times_the_bound_expert_calls_forward_and_backward(monkeypatch):
    """EP and FSSDP call what `GroupedExperts.bind` returns (twice per layer under the exchange overlap):
    those calls, and plain `forward`, are what "expert busy" times."""
    from benchmarks.measure import ExpertBusy
    from sparsetrain.model.experts import GroupedExperts

    monkeypatch.setattr(GroupedExperts, "bind", GroupedExperts.bind)  # restored after the test
    busy = ExpertBusy()
    busy.install()
    experts = GroupedExperts(4, 16, 64)
    experts.reset_parameters(0.1, 0.1)
    x = torch.randn(64, 16, requires_grad=True)
    for call in ("bound", "forward"):
        if call == "bound":
            fn = experts.bind()
            y = torch.cat([fn(x[:32], [8] * 4), fn(x[32:], [8] * 4)])
        else:
            y = experts(x, [16] * 4)
        fwd, bwd = busy.pop()
        assert fwd > 0 and bwd == 0, call
        y.sum().backward()
        fwd, bwd = busy.pop()
        assert fwd == 0 and bwd > 0, call
