"""Fault plans (SPARSETRAIN_FAULTS): parsing, which attempt each fault fires in, and the faults.jsonl record."""
from __future__ import annotations

import json

import pytest

from sparsetrain.train import faults

pytestmark = [pytest.mark.unit]


def test_plan_moves_faults_after_a_fatal_one_to_the_next_attempt():
    plan = faults.parse_plan("delay@1:1, save_kill@1:0,corrupt@3:0,nan@4:1,kill@6:1")
    assert plan == [("delay", 1, 1, 0), ("save_kill", 1, 0, 0), ("corrupt", 3, 0, 1), ("nan", 4, 1, 2),
                    ("kill", 6, 1, 2)]
    with pytest.raises(ValueError, match=r"SPARSETRAIN_FAULTS: mode 'melt' in 'melt@1:0'; allowed: raise, kill"):
        faults.parse_plan("melt@1:0")
    with pytest.raises(ValueError, match=r"'kill@1' is not mode@step:rank"):
        faults.parse_plan("kill@1")


def test_faults_fire_once_in_their_attempt_and_are_recorded(tmp_path, monkeypatch):
    for k in (faults.FAIL_RANK_ENV, faults.FAIL_STEP_ENV, faults.FAIL_MODE_ENV):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(faults.FAULTS_ENV, "nan@2:1,raise@3:0,delay@1:0")
    monkeypatch.setenv(faults.FAIL_DELAY_ENV, "0")
    monkeypatch.setenv(faults.ATTEMPT_ENV, "0")
    assert not faults.maybe_inject(0, 2, tmp_path) and faults.maybe_inject(1, 2, tmp_path)
    with pytest.raises(RuntimeError, match="injected failure on rank 0 at step 3"):
        faults.maybe_inject(0, 3, tmp_path)
    assert not faults.maybe_inject(0, 1, tmp_path)  # the delay is planned for attempt 1
    monkeypatch.setenv(faults.ATTEMPT_ENV, "1")
    assert not faults.maybe_inject(0, 3, tmp_path) and not faults.maybe_inject(0, 1, tmp_path)
    recs = [json.loads(x) for x in (tmp_path / faults.LOG).read_text().splitlines()]
    assert [(r["mode"], r["rank"], r["step"], r["attempt"]) for r in recs] == [
        ("nan", 1, 2, 0), ("raise", 0, 3, 0), ("delay", 0, 1, 1)]


def test_corrupt_newest_changes_the_largest_file_of_the_newest_checkpoint(tmp_path):
    for step, size in ((1, 300), (2, 500)):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / "__0_0.distcp").write_bytes(b"\0" * size)
        (d / "manifest.json").write_text("{}")
    victim = faults.corrupt_newest(tmp_path)
    assert victim == tmp_path / "step_00000002" / "__0_0.distcp"
    assert victim.read_bytes()[250:314] == b"\xff" * 64 and (tmp_path / "step_00000001" / "__0_0.distcp").read_bytes() == b"\0" * 300
