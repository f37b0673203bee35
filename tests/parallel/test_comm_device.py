"""NCCL's device rule on CPU: no collective, in full training steps of any strategy, gets a host tensor.

`audit_collectives` (sparsetrain.parallel.comm_audit) tags tensors built for the host (factories without a
device, `.cpu()`) and makes every torch.distributed collective raise on one. The training runs below cover
dp, ep, fssdp with each planner, re-sharding, N:M, offload and grad accumulation, with a log and an eval
step each, on 2 gloo ranks; the negative tests show the audit catches the bug it is for.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from sparsetrain.parallel import comm
from tests.dist_utils import DistributedError, run_distributed
from tests.parity_utils import small_config, train_and_collect

pytestmark = pytest.mark.distributed

CASES = {
    "dp": ["parallel.strategy=dp"],
    "dp-ddp-accum": ["parallel.strategy=dp", "parallel.dense=ddp", "train.grad_accum=2"],
    "ep": ["parallel.strategy=ep"],
    "ep-nm": ["parallel.strategy=ep", "sparsity.enabled=true"],
    "fssdp-hecate-reshard": ["parallel.strategy=fssdp", "parallel.fssdp.reshard_every=2", "moe.router_skew=1.2"],
    "fssdp-eplb-accum": ["parallel.strategy=fssdp", "parallel.fssdp.planner=eplb", "train.grad_accum=2"],
    "fssdp-lpt-offload": ["parallel.strategy=fssdp", "parallel.fssdp.planner=lpt_spill", "offload.enabled=true",
                          "offload.min_tensor_bytes=0"],
    "fssdp-none-nm": ["parallel.strategy=fssdp", "parallel.fssdp.planner=none", "sparsity.enabled=true"],
    "fssdp-measured-budget": ["parallel.strategy=fssdp", "parallel.fssdp.overlap_budget=-1",
                              "parallel.fssdp.keep_materialized=true"],
}


def _train_all(rank: int, world: int, cases: dict[str, dict], out: str) -> dict[str, int]:
    from sparsetrain.parallel.comm_audit import audit_collectives

    steps = {}
    with audit_collectives():
        for name, cfg in cases.items():
            res = train_and_collect(cfg, f"{out}/{name}")
            steps[name] = len(res["losses"])
    return steps


def test_every_strategy_keeps_collectives_on_the_comm_device(tmp_path):
    extra = ["train.log_every=1", "train.eval_every=3", "data.eval_batches=1", "checkpoint.save_final=true"]
    cases = {name: small_config(*ov, *extra, steps=3) for name, ov in CASES.items()}
    results = run_distributed(_train_all, 2, cases, str(tmp_path), timeout=900)
    assert all(r == {name: 3 for name in CASES} for r in results), results


def _host_tensor_collective(rank: int, world: int, how: str) -> str:
    import torch.distributed as dist

    from sparsetrain.parallel.comm import all_gather_host, all_reduce_host
    from sparsetrain.parallel.comm_audit import CommDeviceError, audit_collectives

    with audit_collectives():
        assert float(all_reduce_host([1.0])[0]) == world  # the helpers are clean
        assert all_gather_host([float(rank)]).flatten().tolist() == [0.0, 1.0]
        ok = torch.ones(2, device=torch.device("cpu"))
        dist.all_reduce(ok)  # built on an explicit device: what NCCL gets on a GPU run
        bad = {"factory": lambda: torch.tensor([1.0]), "cpu": lambda: ok.cpu() * 2,
               "derived": lambda: torch.zeros(3).double() + 1}[how]()
        try:
            dist.all_reduce(bad)
        except CommDeviceError as e:
            return str(e)
    return "no error"


@pytest.mark.parametrize("how", ["factory", "cpu", "derived"])
def test_audit_refuses_a_host_tensor(how):
    msgs = run_distributed(_host_tensor_collective, 2, how)
    assert all("host tensor" in m and "test_comm_device.py" in m for m in msgs), msgs


def _old_rank_tokens(rank: int, world: int, cfg: dict, out: str) -> None:
    """The pre-fix `rank_tokens_max_mean` (a CPU tensor into all_gather) put back into a log step."""
    import torch.distributed as dist

    from sparsetrain.parallel.comm_audit import audit_collectives
    from sparsetrain.parallel.strategy import Strategy

    def local_log_values(self):
        t = torch.tensor([1.0], dtype=torch.float64)
        parts = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return {}

    with mock.patch.object(Strategy, "local_log_values", local_log_values), audit_collectives():
        train_and_collect(cfg, out)


def test_one_cpu_tensor_put_back_fails_the_run(tmp_path):
    cfg = small_config("parallel.strategy=ep", steps=1)
    with pytest.raises(DistributedError, match="all_gather got a host tensor"):
        run_distributed(_old_rank_tokens, 2, cfg, str(tmp_path))


def test_comm_device_by_backend(monkeypatch):
    monkeypatch.setattr(comm, "is_dist", lambda: True)
    for backend, want in [("gloo", "cpu"), ("fake", "cpu")]:
        monkeypatch.setattr(comm.dist, "get_backend", lambda g=None, b=backend: b)
        assert comm.comm_device().type == want
    monkeypatch.setitem(comm.COMM_DEVICES, "nccl", lambda: torch.device("cuda", 3))
    for backend in ("nccl", "cpu:gloo,cuda:nccl"):
        monkeypatch.setattr(comm.dist, "get_backend", lambda g=None, b=backend: b)
        assert comm.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(comm.dist, "get_backend", lambda g=None: "ucc")
    with pytest.raises(ValueError, match="no communication device"):
        comm.comm_device()
