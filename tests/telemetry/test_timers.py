"""Step spans: host clock on CPU; on CUDA, events resolved when popped (no device sync inside a span)."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from sparsetrain.telemetry.timers import StepTimers

pytestmark = [pytest.mark.unit]


def test_disabled_spans_record_nothing_and_enabled_spans_add_up():
    t = StepTimers()
    with t.span("experts"):
        pass
    assert t.pop() == ({}, {})
    t.enabled = True
    for _ in range(2):
        with t.span("experts"):
            sum(range(20000))
    wall, cpu = t.pop()
    assert set(wall) == set(cpu) == {"experts"} and wall["experts"] > 0 and cpu["experts"] > 0
    assert t.pop() == ({}, {})


class _Event:
    """Stands in for torch.cuda.Event: a recorded 'device' clock, and whether anyone waited on it."""
    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at = None
        self.waited = False

    def record(self) -> None:
        _Event.clock += 5.0  # ms of device work between any two records
        self.at = _Event.clock

    def synchronize(self) -> None:
        self.waited = True

    def elapsed_time(self, end: _Event) -> float:
        assert end.waited, "read before the end event completed"
        return end.at - self.at


def test_cuda_spans_use_events_and_never_synchronize_the_device():
    t = StepTimers()
    t.enabled, t.cuda_events = True, True
    with mock.patch.object(torch.cuda, "Event", _Event), \
            mock.patch.object(torch.cuda, "synchronize", side_effect=AssertionError("device sync in a span")):
        with t.span("dispatch"):
            pass
        with t.span("dispatch"):
            pass
        assert t.totals == {}  # nothing resolved (nor waited for) until the log step pops
        wall, cpu = t.pop()
    assert wall == {"dispatch": pytest.approx(0.010)}  # 2 spans x 5 ms of device time
    assert set(cpu) == {"dispatch"}
