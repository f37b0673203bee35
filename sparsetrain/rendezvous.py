"""The torch rendezvous store, bound to loopback when the whole job is on this machine.

`init_process_group("env://")` makes rank 0's TCPStore listen on every interface
(`*:MASTER_PORT`, seen with `ss -ltnp`) whatever MASTER_ADDR says. When MASTER_ADDR
is a loopback address no rank can be elsewhere, so rank 0 binds the listening
socket itself on that address and hands it to the TCPStore (`master_listen_fd`),
and gloo's pairs are pinned to the loopback interface (GLOO_SOCKET_IFNAME=lo)
unless the user chose one. torch is imported only when a store is made (the launcher imports this).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed as dist


def is_loopback(host: str) -> bool:
    """True for 'localhost' and 127.0.0.0/8 / ::1 addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LISTEN_FD_ENV = "SPARSETRAIN_MASTER_LISTEN_FD"  # rank 0: a socket already listening on MASTER_PORT (Ray launcher)


def loopback_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """A TCPStore on MASTER_ADDR:MASTER_PORT listening on loopback only; None when MASTER_ADDR is not loopback
    or torchrun already serves the store (TORCHELASTIC_USE_AGENT_STORE)."""
    host, port = os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", "0") or 0)
    if not is_loopback(host) or not port or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    import torch.distributed as dist

    addr = "127.0.0.1" if host == "localhost" else host
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if rank != 0:
        return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    if held := os.environ.pop(LISTEN_FD_ENV, ""):  # listening since before the port was published: no race
        return dist.TCPStore(addr, port, world, is_master=True, timeout=timeout, master_listen_fd=int(held))
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(world * 2)
    store = dist.TCPStore(addr, port, world, is_master=True, timeout=timeout, master_listen_fd=sock.detach())
    return store
