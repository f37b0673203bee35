"""Pure pieces of launching: rank assignment, per-rank environment, log prefixes.

Nothing here imports ray or torch; everything is a function of plain values so it
is unit-tested without processes.
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

PROGRESS_ENV = "SPARSETRAIN_PROGRESS"  # "0" on ranks that must not draw a progress bar
FAIL_RANK_ENV = "SPARSETRAIN_FAIL_RANK"  # test hook honoured by the trainer: that rank raises
ENTRY_ENV = "SPARSETRAIN_ENTRY"  # module:function run on every rank instead of the trainer (default: train_worker)
FORWARD_PREFIX = "SPARSETRAIN_"  # driver env vars with this prefix are forwarded to every worker


@dataclass(frozen=True)
class RankSlot:
    """Where one worker sits in the world."""

    rank: int
    local_rank: int
    local_world_size: int
    node: str


def assign_ranks(nodes: list[str]) -> list[RankSlot]:
    """Give ranks to workers placed on `nodes` (one entry per worker, in creation order).

    Ranks are contiguous per node, nodes ordered by first appearance (so worker 0's
    node holds rank 0); LOCAL_RANK counts within a node; LOCAL_WORLD_SIZE is the
    number of workers Ray placed on that node. Returns one slot per input worker.
    """
    order: list[str] = []
    for n in nodes:
        if n not in order:
            order.append(n)
    counts = {n: nodes.count(n) for n in order}
    base, acc = {}, 0
    for n in order:
        base[n], acc = acc, acc + counts[n]
    seen: dict[str, int] = {}
    slots = []
    for n in nodes:
        lr = seen.get(n, 0)
        seen[n] = lr + 1
        slots.append(RankSlot(rank=base[n] + lr, local_rank=lr, local_world_size=counts[n], node=n))
    return slots


def rank_env(slot: RankSlot, world_size: int, master_addr: str, master_port: int, torch_threads: int) -> dict[str, str]:
    """The environment train_worker expects for one rank."""
    env = {
        "RANK": str(slot.rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(slot.local_rank),
        "LOCAL_WORLD_SIZE": str(slot.local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "OMP_NUM_THREADS": str(torch_threads),
        "MKL_NUM_THREADS": str(torch_threads),
        PROGRESS_ENV: "1" if slot.rank == 0 else "0",
    }
    return env


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Driver env vars (SPARSETRAIN_*) that every worker should see too."""
    src = os.environ if environ is None else environ
    return {k: v for k, v in src.items() if k.startswith(FORWARD_PREFIX) and k != PROGRESS_ENV}


@contextlib.contextmanager
def patched_env(env: dict[str, str]) -> Iterator[None]:
    """Set env vars in this process for the duration of the block, then restore the old values."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def visible_devices(own: list[str], node_gpus_by_local_rank: list[list[str]]) -> str:
    """CUDA_VISIBLE_DEVICES for one worker: every GPU of its node, ordered by local rank.

    With that order `cuda:LOCAL_RANK` is the worker's own GPU while NCCL still sees
    its peers on the node (peer-to-peer). `own` must be the worker's Ray GPU ids.
    """
    ordered: list[str] = []
    for ids in node_gpus_by_local_rank:
        ordered.extend(i for i in ids if i not in ordered)
    if not all(i in ordered for i in own):
        raise ValueError(f"worker GPUs {own} are not among its node's GPUs {ordered}")
    return ",".join(ordered)


def free_port(host: str = "") -> int:
    """A TCP port free right now on this machine (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tcp_error(host: str, port: int, timeout_s: float = 5.0) -> str | None:
    """None if something accepts TCP connections at host:port, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return str(e) or type(e).__name__


def split_host_port(address: str) -> tuple[str, int] | None:
    """'host:port' -> (host, port); None for 'auto', 'local', ray:// or other forms Ray resolves itself."""
    if "://" in address or address.count(":") != 1:
        return None
    host, _, port = address.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


class LinePrefixer:
    """Splits a byte/text stream into lines and prefixes each with `(rank N) `.

    Handles partial chunks (a line split across reads) and carriage returns, so a
    tqdm bar (`\\r`-updated) stays one updating line on a terminal. With
    keep_cr=False (output is a file or job log) the `\\r` frames are dropped and
    only whole lines pass. `feed` returns complete segments ready to print;
    `flush` returns what is left at the end.
    """

    def __init__(self, rank: int, keep_cr: bool = True) -> None:
        self.prefix = f"(rank {rank}) "
        self.keep_cr = keep_cr
        self._buf = ""

    def feed(self, text: str) -> str:
        """Add text; return every completed line (ending in \\n or \\r), prefixed."""
        self._buf = (self._buf + text).replace("\r\n", "\n")
        out = []
        start = 0
        end = len(self._buf) - 1 if self._buf.endswith("\r") else len(self._buf)  # "\r" may start a "\r\n"
        for i, ch in enumerate(self._buf[:end]):
            if ch in "\r\n":
                seg = self._buf[start:i]
                if ch == "\n" or (seg and self.keep_cr):
                    out.append(self.prefix + seg + ch)
                start = i + 1
        self._buf = self._buf[start:]
        return "".join(out)

    def flush(self) -> str:
        """Return the unterminated rest (with a newline), if any."""
        rest, self._buf = self._buf.rstrip("\r"), ""
        return self.prefix + rest + "\n" if rest else ""


class PrefixedStream(io.TextIOBase):
    """A text stream that writes every line to `base` with a `(rank N) ` prefix.

    Used where each rank owns its stdout/stderr (torchrun) so their interleaved
    console output reads like the Ray launcher's. Whole lines pass at once; a
    partial line waits for its end (or `close_rest`).
    """

    def __init__(self, base: io.TextIOBase, rank: int) -> None:
        super().__init__()
        self.base = base
        self.prefixer = LinePrefixer(rank, keep_cr=base.isatty())

    def write(self, text: str) -> int:
        if out := self.prefixer.feed(text):
            self.base.write(out)
        return len(text)

    def flush(self) -> None:
        self.base.flush()

    def isatty(self) -> bool:
        return self.base.isatty()

    def fileno(self) -> int:
        return self.base.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.base, "encoding", "utf-8")

    def close_rest(self) -> None:
        """Write the unterminated rest, if any, and flush."""
        if rest := self.prefixer.flush():
            self.base.write(rest)
        self.base.flush()


PEER_ERROR_MARKERS = (
    "Connection reset by peer", "Connection closed by peer", "remote worker", "Broken pipe",
    "NCCL communicator was aborted", "DistBackendError", "Watchdog caught collective operation timeout",
    "Socket Timeout", "ECONNRESET",
)


def is_peer_error(details: str) -> bool:
    """True for errors a rank raises because *another* rank went away (an echo, not the cause)."""
    return any(m in details for m in PEER_ERROR_MARKERS)


@dataclass(frozen=True)
class Failure:
    """One rank's failure as the driver saw it."""

    rank: int
    message: str
    details: str
    time: float
    died: bool = False

    def priority(self) -> tuple[int, float, int]:
        """Sort key: own errors first, then dead processes, then peer-error echoes; earliest first."""
        kind = 2 if is_peer_error(self.details) else (1 if self.died else 0)
        return kind, self.time, self.rank


def root_cause(failures: list[Failure]) -> Failure:
    """The failure that most likely caused the others."""
    return min(failures, key=Failure.priority)
