"""Process and socket tables read from /proc (Linux; stdlib only, so the reaper can run it bare).

`descendants(pid)` finds everything a launcher started (Ray's agents rename
themselves with setproctitle, which also overwrites their environment, so the
process tree is the one reliable way to find them); `listening_sockets()` maps
every listening TCP socket to the pid holding it, like `ss -ltnp`.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1], starttime [19])."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """Kernel start time of a live process (clock ticks since boot); None if it is gone or a zombie."""
    f = _stat_fields(pid)
    if f is None or f[0] in ("Z", "X"):
        return None
    return int(f[19])


def alive(recorded: dict[int, int | None]) -> list[int]:
    """The pids of `recorded` ({pid: start time}) that are still the same process (pids are reused)."""
    return [p for p, t in recorded.items() if t is not None and start_time(p) == t]


def parent_map() -> dict[int, int]:
    """{pid: ppid} of every live process."""
    out = {}
    for d in PROC.iterdir():
        if d.name.isdigit() and (f := _stat_fields(int(d.name))) is not None:
            out[int(d.name)] = int(f[1])
    return out


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` in the process tree (not `pid` itself)."""
    children: dict[int, list[int]] = {}
    for child, parent in parent_map().items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket: address, port and the pids that hold it."""

    address: str
    port: int
    pids: tuple[int, ...]

    @property
    def loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.x)."""
        ip = ipaddress.ip_address(self.address)
        mapped = getattr(ip, "ipv4_mapped", None)
        return (mapped or ip).is_loopback


def _hex_addr(text: str) -> tuple[str, int]:
    """Decode /proc/net/tcp{,6} 'ADDR:PORT' (little-endian 32-bit words) to (ip, port)."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def _socket_owners() -> dict[str, list[int]]:
    """{socket inode: [pids]} from every readable /proc/<pid>/fd."""
    owners: dict[str, list[int]] = {}
    for d in PROC.iterdir():
        if not d.name.isdigit():
            continue
        try:
            fds = list((d / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                owners.setdefault(link[8:-1], []).append(int(d.name))
    return owners


def listening_sockets() -> list[Listener]:
    """Every listening TCP socket on this host (IPv4 and IPv6) with the pids that hold it."""
    owners = _socket_owners()
    out = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A":  # TCP_LISTEN
                continue
            ip, port = _hex_addr(cols[1])
            out.append(Listener(ip, port, tuple(sorted(set(owners.get(cols[9], []))))))
    return out
