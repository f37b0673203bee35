"""The multi-rank harness names the rank that caused a failure, not a peer that only lost it."""
from __future__ import annotations

import os
import re
import time

import pytest

from tests.dist_utils import DistributedError, _root_cause, run_distributed


def _dies_after_its_peer_echoes(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(1.0)  # its peer's echo reaches the parent first
        os._exit(7)
    raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection reset by peer")


def _raises(rank: int, world_size: int) -> None:
    raise ValueError(f"rank {rank}'s own error")


def test_a_crash_is_named_before_the_echo_that_reached_the_parent_first() -> None:
    with pytest.raises(DistributedError) as err:
        run_distributed(_dies_after_its_peer_echoes, 2, timeout=60)
    text = str(err.value)
    assert re.match(r"rank 0 (exited with code 7|closed its pipe) without a result", text), text
    assert "also rank 1: RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection reset by peer" in text


def test_own_errors_are_reported_without_waiting_for_the_grace() -> None:
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match=r"(?s)rank \d failed:\n.*ValueError: rank \d's own error"):
        run_distributed(_raises, 2, timeout=60)
    assert time.monotonic() - t0 < 30


def test_root_cause_order() -> None:
    echo = "rank 0 failed:\nTraceback ...\nRuntimeError: Connection closed by peer"
    own = "rank 2 failed:\nTraceback ...\nValueError: NaN loss"
    died = "rank 3 exited with code -9 without a result"
    assert _root_cause({0: echo, 2: own}).startswith(own)
    assert _root_cause({0: echo, 2: own, 3: died}).splitlines()[0] == died
    assert _root_cause({0: echo}) == echo
