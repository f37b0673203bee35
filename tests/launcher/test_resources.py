"""A job whose resources the cluster cannot give says what it asked for and what the cluster has while it
waits, and fails after launch.resource_timeout_s with that line (Ray's calls stubbed: no cluster needed)."""
from __future__ import annotations

import pytest
from sparsetrain.launcher import resources
from sparsetrain.launcher.errors import LaunchError

from sparsetrain.config import ConfigError, load_config

pytestmark = [pytest.mark.unit]


def test_wait_line_names_request_and_cluster():
    line = resources.wait_line(4, {"CPU": 8.0, "GPU": 1.0}, 30.2, 600, {"CPU": 16.0, "memory": 2 * 2**30},
                               {"CPU": 4.0}, 2)
    assert line == ("waiting for resources 30s (launch.resource_timeout_s=600): asked for 4 rank(s) x "
                    "{CPU 8, GPU 1} = CPU 32, GPU 4; the cluster has 2 node(s) with CPU 16, GPU 0, memory 2.0 GiB "
                    "(CPU 4, GPU 0 free)")


def test_unsatisfiable_request_reports_then_fails(monkeypatch):
    ray = pytest.importorskip("ray")
    import sys

    pgmod = sys.modules["ray.util.placement_group"]  # (ray.util.placement_group is also a function's name)

    removed, logs = [], []

    class PG:
        def ready(self):
            return "ref"

    def never(ref, timeout):
        import time

        time.sleep(timeout)
        raise ray.exceptions.GetTimeoutError("not ready")

    monkeypatch.setattr(ray, "get", never)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    monkeypatch.setattr(pgmod, "placement_group", lambda bundles, strategy, name: PG())
    monkeypatch.setattr(pgmod, "remove_placement_group", removed.append)
    with pytest.raises(LaunchError, match=r"gave up waiting for resources .* asked for 2 rank\(s\) x \{CPU 1, GPU 1\}"
                                          r" = CPU 2, GPU 2; the cluster has 1 node\(s\) with CPU 2, GPU 0"):
        resources.reserve(2, 1, 1, timeout_s=0.35, local=False, every_s=0.1, log=logs.append)
    assert len(logs) >= 2 and all(ln.startswith("waiting for resources") for ln in logs)
    assert len(removed) == 1  # the pending placement group is not left behind


def test_resource_timeout_must_be_positive():
    assert load_config("tiny", []).launch.resource_timeout_s == 600.0
    with pytest.raises(ConfigError, match="launch.resource_timeout_s must be > 0"):
        load_config("tiny", ["launch.resource_timeout_s=0"])
