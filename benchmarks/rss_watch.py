"""Run a command and poll, from outside, the RSS of every process in its tree; print each one's high-water.

Memory measured the way an operator sees it (no cooperation from the processes), e.g. the meta-device
acceptance run of issue 9:

    python benchmarks/rss_watch.py -- sparsetrain train -c tiny --set launch.backend=torchrun \\
        --set launch.workers=8 --set moe.num_experts=64 --set model.d_model=256 --set moe.d_ffn=2048 \\
        --set model.n_layers=4 --set train.steps=3 --set train.out_dir=/tmp/rss8 \\
        --set train.cpu_exact_memory=true

Linux only (reads /proc). Prints one line per process whose high-water was the largest seen, sorted, and the
command's exit code.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        kids = (task / "children")
        if kids.exists():
            out += [int(x) for x in kids.read_text().split()]
    return out


def _tree(root: int) -> list[int]:
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        try:
            todo += _children(pid)
        except OSError:
            pass
    return seen


def _rss_mib(pid: int) -> tuple[float, str]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return 0.0, ""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024, cmd
    return 0.0, cmd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=0.2, help="poll interval (s)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to run")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    proc = subprocess.Popen(cmd)
    peak: dict[int, tuple[float, str]] = {}
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            rss, name = _rss_mib(pid)
            if rss > peak.get(pid, (0.0, ""))[0]:
                peak[pid] = (rss, name)
        time.sleep(args.every)
    rows = sorted(peak.items(), key=lambda kv: -kv[1][0])
    print(f"\nRSS high-water per process (polled every {args.every}s), exit code {proc.returncode}:")
    for pid, (rss, name) in rows:
        print(f"{rss:9.1f} MiB  pid {pid}  {name[:110]}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
