"""Worker console capture for the Ray launcher, and the driver's side of it.

A worker redirects its fds 1 and 2 into pipes (`OutputCapture`); a reader thread keeps the raw bytes for the
driver's `drain`, tees them to the old fds (Ray's worker log) and appends them to the rank's console log
`<out_dir>/logs/rank<R>.{out,err}` (the local mirror for a URL out_dir). The driver (`RankOutput`) decodes
what it drained, prefixes each line with `(rank R) ` and counts the bytes. A SIGKILLed worker takes its
undrained bytes with it (up to one poll, 0.2 s, more under load: often the lines that say why); the driver
then reads them from the console log, from where its count stops. On a cluster that needs out_dir on storage
the driver's node sees, as the heartbeat watcher does; where it is not, those last lines are not recovered.
"""
from __future__ import annotations

import codecs
import os
import sys
import threading
from pathlib import Path

from sparsetrain.launcher.env import LinePrefixer

STREAMS = (("out", 1), ("err", 2))  # (console log suffix, fd)


def console_log_dir(out_dir: str) -> Path:
    """Where the ranks' console logs go: `<out_dir>/logs`, absolute (Ray workers may not share the cwd)."""
    from sparsetrain.train.location import local_dir

    return local_dir(out_dir).absolute() / "logs"


def console_log(log_dir: str | Path, rank: int, suffix: str) -> Path:
    """`<log_dir>/rank<R>.<suffix>` (suffix: out | err)."""
    return Path(log_dir) / f"rank{rank}.{suffix}"


class OutputCapture:
    """Redirects this process's fds 1 and 2 into pipes; keeps the bytes for the driver, tees to the old fds and to
    the rank's console log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[int, list[bytes]] = {1: [], 2: []}
        self._saved: dict[int, int] = {}
        self._logs: dict[int, int] = {}
        self._threads: list[threading.Thread] = []

    def start(self, log_dir: str | Path | None = None, rank: int = 0) -> None:
        """Begin capturing (flushes Python's buffers first); with log_dir also append to its rank<R>.out/.err."""
        for f in (sys.stdout, sys.stderr):
            f.flush()
        if log_dir is not None:
            try:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                for suffix, fd in STREAMS:
                    path = console_log(log_dir, rank, suffix)
                    self._logs[fd] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as e:  # a read-only or full out_dir: the driver still gets the drained output
                print(f"warning: no console log in {log_dir}: {e}", file=sys.stderr, flush=True)
        for _, fd in STREAMS:
            self._saved[fd] = os.dup(fd)
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            t = threading.Thread(target=self._pump, args=(fd, r), daemon=True)
            t.start()
            self._threads.append(t)
        for f in (sys.stdout, sys.stderr):
            if hasattr(f, "reconfigure"):
                f.reconfigure(line_buffering=True)

    def _pump(self, fd: int, r: int) -> None:
        while True:
            data = os.read(r, 65536)
            if not data:
                break
            if fd in self._logs:
                os.write(self._logs[fd], data)  # first: a SIGKILL may come before the driver's next drain
            os.write(self._saved[fd], data)  # keep Ray's worker log file complete
            with self._lock:
                self._data[fd].append(data)
        os.close(r)

    def stop(self) -> None:
        """Restore the fds and wait until everything written has been read."""
        for f in (sys.stdout, sys.stderr):
            f.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes the pipe's last writer -> reader sees EOF
        for t in self._threads:
            t.join(timeout=5)
        for fd in (*self._saved.values(), *self._logs.values()):
            os.close(fd)
        self._saved.clear()
        self._logs.clear()
        self._threads.clear()

    def drain(self) -> tuple[bytes, bytes]:
        """Bytes captured since the last call, as (stdout, stderr)."""
        with self._lock:
            out, err = b"".join(self._data[1]), b"".join(self._data[2])
            self._data = {1: [], 2: []}
        return out, err


class _Stream:
    """One stream of one rank on the driver: utf-8 decoding across chunks, line prefixes, bytes received."""

    def __init__(self, rank: int, keep_cr: bool, log: Path | None) -> None:
        self.prefixer = LinePrefixer(rank, keep_cr)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.log = log
        self.start = _size(log)  # the console log is appended to across restarts: this run's part starts here
        self.received = 0

    def feed(self, data: bytes, final: bool) -> str:
        self.received += len(data)
        text = self.prefixer.feed(self.decoder.decode(data, final=final))
        return text + self.prefixer.flush() if final else text

    def lost(self) -> bytes:
        """What the console log holds beyond the drained bytes (the worker died before the driver read them)."""
        if self.log is None:
            return b""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.start + self.received)
                return f.read()
        except OSError:  # not on this node's filesystem
            return b""


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


class RankOutput:
    """The driver's view of one rank's console: prints drained chunks with `(rank R) ` prefixes."""

    def __init__(self, rank: int, tty: tuple[bool, bool], log_dir: str | Path | None = None) -> None:
        self.streams = [_Stream(rank, keep_cr, console_log(log_dir, rank, suffix) if log_dir is not None else None)
                        for (suffix, _), keep_cr in zip(STREAMS, tty)]

    def show(self, out: bytes, err: bytes, final: bool = False) -> None:
        """Print a drained (stdout, stderr) pair; final: also the unterminated rests."""
        for stream, data, sink in zip(self.streams, (out, err), (sys.stdout, sys.stderr)):
            if text := stream.feed(data, final):
                sink.write(text)
                sink.flush()

    def recover(self) -> None:
        """The rank's process is gone: print what its console log holds that the driver never drained."""
        out, err = (s.lost() for s in self.streams)
        self.show(out, err, final=True)
