"""launch.min_workers: which world sizes an elastic restart may use, the config errors, the shrink decision."""
from __future__ import annotations

import pytest
from sparsetrain.launcher.elastic import ray_placeable, shrink, world_sizes
from sparsetrain.launcher.errors import LaunchError

from sparsetrain.config import ConfigError, load_config, to_dict

BASE = ["parallel.strategy=fssdp", "parallel.pretend_nodes=0", "data.batch_size=16"]


@pytest.mark.unit
def test_world_sizes_keep_the_global_batch_and_the_layout():
    cfg = load_config("tiny", [*BASE, "launch.workers=4", "launch.min_workers=1"])
    assert world_sizes(cfg) == [4, 2, 1]  # 3 does not divide 4 x grad_accum 1
    cfg = load_config("tiny", [*BASE, "launch.workers=4", "launch.min_workers=1", "parallel.ep_size=4"])
    assert world_sizes(cfg) == [4, 1]  # ep_size=4 does not divide 2 ranks (1 rank has no expert parallelism)
    cfg = load_config("tiny", [*BASE, "launch.workers=4", "launch.min_workers=2", "train.grad_accum=2"])
    assert world_sizes(cfg) == [4, 2]


@pytest.mark.unit
@pytest.mark.parametrize("sets, match", [
    (["launch.workers=4", "launch.min_workers=3"], (r"launch.min_workers=3: no world size in \[3, 4\) keeps the "
                                                   r"global batch .* that divide 4: 1, 2$")),
    (["launch.workers=4", "launch.min_workers=5"], r"launch.min_workers=5 must be in \[1, launch.workers=4\]"),
    (["launch.workers=4", "launch.min_workers=-1"], r"launch.min_workers=-1 must be in"),
    (["launch.workers=4", "launch.min_workers=2", "parallel.ep_size=4"], r"launch.min_workers=2: no world size"),
])
def test_impossible_min_workers_is_refused_in_one_line(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [*BASE, *sets])


@pytest.mark.unit
def test_shrink_raises_grad_accum_and_logs_one_line():
    cfg = to_dict(load_config("tiny", [*BASE, "launch.workers=4", "launch.min_workers=2"]))
    logs: list[str] = []
    assert shrink(cfg, 4, logs.append) is cfg and shrink(cfg, 9, logs.append) is cfg and not logs
    small = shrink(cfg, 3, logs.append)
    assert small["launch"]["workers"] == 2 and small["train"]["grad_accum"] == 2 and cfg["launch"]["workers"] == 4
    assert small["data"]["batch_size"] == 16
    assert logs == [("elastic: 3 of launch.workers=4 worker(s) can be placed; continuing on 2 rank(s) with "
                    "train.grad_accum 1 -> 2 (global batch data.batch_size=16 kept)")]
    with pytest.raises(LaunchError, match=r"only 1 of launch.workers=4 worker\(s\) can be placed; launch.min_workers=2"):
        shrink(cfg, 1, logs.append)
    off = to_dict(load_config("tiny", [*BASE, "launch.workers=4"]))
    assert shrink(off, 1, logs.append) is off  # not elastic: the launcher waits for resources as before


@pytest.mark.unit
def test_ray_placeable_counts_bundles_on_alive_nodes():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 3.0}}]
    assert ray_placeable(2, 0, nodes) == 5
    assert ray_placeable(1, 1, nodes) == 2


@pytest.mark.unit
def test_reserve_counts_again_while_a_lost_node_still_looks_alive(capsys):
    """Right after a node is lost Ray still reports it alive: the first count asks for all 4 ranks. While that
    reservation waits, the count is taken again; once the node is marked dead, 2 ranks are reserved."""
    from sparsetrain.launcher.elastic import reserve_elastic

    cfg = to_dict(load_config("tiny", [*BASE, "launch.workers=4", "launch.min_workers=2"]))
    counts = iter([4, 4, 2])  # alive-node view: stale twice, then the dead node is gone
    asked = []

    def reserve(n, timeout_s):
        asked.append(n)
        if n > 2:
            raise LaunchError("gave up waiting for resources")
        return "pg"

    run_cfg, pg = reserve_elastic(cfg, 1, 0, timeout_s=30.0, reserve_fn=reserve, placeable_fn=lambda: next(counts),
                                  recheck_s=0.01)
    assert pg == "pg" and asked == [4, 4, 2] and run_cfg["launch"]["workers"] == 2
    assert "elastic: 2 of launch.workers=4" in capsys.readouterr().err
    with pytest.raises(LaunchError, match="gave up"):  # nothing ever fits: the wait still ends at its timeout
        reserve_elastic(cfg, 1, 0, timeout_s=0.05, reserve_fn=reserve, placeable_fn=lambda: 4, recheck_s=0.01)
