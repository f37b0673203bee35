"""`python -m sparsetrain.launcher.hostip [PEER]`: this node's address that PEER can reach (for Ray's head).

`hostname --ip-address` returns whatever /etc/hosts maps the name to, often 127.0.1.1 on Debian/Ubuntu,
and a Ray head started on it is unreachable from the other nodes. This picks the source address the kernel
routes towards PEER (a UDP connect sends no packet), else the first non-loopback address of this host's
name, and refuses loopback with a one-line error.
"""
from __future__ import annotations

import ipaddress
import socket
import sys


def _routable(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return not (addr.is_loopback or addr.is_unspecified or addr.is_link_local)


def source_ip_towards(peer: str, port: int = 9) -> str | None:
    """The local IPv4 address the kernel would send from to reach `peer` (None if it has no route)."""
    try:
        target = socket.getaddrinfo(peer, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(target)
            return str(s.getsockname()[0])
    except OSError:
        return None


def host_ip(peer: str | None = None) -> str:
    """A non-loopback IPv4 address of this node, preferably the one that routes to `peer`."""
    if peer and (ip := source_ip_towards(peer)) and _routable(ip):
        return ip
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    for info in infos:
        if _routable(ip := str(info[4][0])):
            return ip
    raise RuntimeError(f"no routable IPv4 address found on {socket.gethostname()} (only loopback"
                       f"{f', and no route to {peer}' if peer else ''}); set HEAD_IP to the address other nodes reach")


def main(argv: list[str] | None = None) -> int:
    """Print the address; exit 1 with a one-line message when there is none."""
    args = sys.argv[1:] if argv is None else argv
    try:
        print(host_ip(args[0] if args else None))
    except RuntimeError as e:
        print(f"hostip: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
