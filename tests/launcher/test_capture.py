"""Worker console capture (fd-level, teed to the rank's console log) and the driver's recovery of a dead rank's
undrained lines."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sparsetrain.launcher.capture import RankOutput, console_log, console_log_dir


def test_capture_keeps_bytes_for_driver_tees_to_old_fd_and_appends_to_console_log(tmp_path: Path) -> None:
    code = f"""
import json, os, sys
from sparsetrain.launcher.capture import OutputCapture
cap = OutputCapture()
cap.start({str(tmp_path)!r}, rank=3)
print("from python é")
os.write(1, b"from C\\n")
os.write(2, b"to stderr\\n")
cap.stop()
out, err = cap.drain()
print(json.dumps([out.decode(), err.decode()]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    *teed, last = proc.stdout.splitlines()
    assert json.loads(last) == ["from python é\nfrom C\n", "to stderr\n"]  # what the driver drains
    assert teed == ["from python é", "from C"] and proc.stderr == "to stderr\n"  # Ray's worker log
    assert console_log(tmp_path, 3, "out").read_text() == "from python é\nfrom C\n"
    assert console_log(tmp_path, 3, "err").read_text() == "to stderr\n"


def test_recover_prints_only_what_was_never_drained(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = console_log(tmp_path, 1, "out")
    log.write_bytes(b"an earlier attempt\n")  # console logs are appended to across restarts
    view = RankOutput(1, (False, False), tmp_path)
    this_run = "step 1\nstep 2 é\nKilled at step 3".encode()
    log.write_bytes(log.read_bytes() + this_run)
    cut = this_run.index("é".encode()) + 1  # the driver drained up to the middle of a two-byte character
    view.show(this_run[:cut], b"")
    assert capsys.readouterr().out == "(rank 1) step 1\n"
    view.recover()
    assert capsys.readouterr().out == "(rank 1) step 2 é\n(rank 1) Killed at step 3\n"


def test_recover_without_a_readable_console_log_prints_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    view = RankOutput(0, (False, False), tmp_path / "not-on-this-node")
    view.show(b"partial", b"")
    view.recover()  # the unterminated rest still comes out
    assert capsys.readouterr().out == "(rank 0) partial\n"
    RankOutput(0, (False, False), None).recover()
    assert capsys.readouterr() == ("", "")


def test_console_log_dir_is_absolute_under_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert console_log_dir("runs/x") == tmp_path / "runs" / "x" / "logs"
