"""COMM.relabel: a block's adds under one name count under another, on this thread only."""
from __future__ import annotations

import threading

import pytest

from sparsetrain.telemetry.comm import CommStats

pytestmark = [pytest.mark.unit]


def test_relabel_counts_under_the_new_name_on_this_thread_only():
    c = CommStats()
    c.add("spag", 10)
    with c.relabel("spag", "reshard"):
        c.add("spag", 5)
        c.add("sprs", 3)
        other = threading.Thread(target=c.add, args=("spag", 7))  # another thread (e.g. autograd's) is not relabelled
        other.start()
        other.join()
        with c.relabel("sprs", "x"):
            c.add("sprs", 1)
        c.add("sprs", 2)  # the inner block's alias is gone again
    c.add("spag", 1)
    assert c.snapshot() == {"spag": 18, "reshard": 5, "sprs": 5, "x": 1}
