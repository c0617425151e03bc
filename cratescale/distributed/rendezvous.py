"""Where the ranks of a multi-node job meet: the master's address and the interface gloo binds.

Both come from the allocation, not from guesses: on a cluster whose node names resolve, the first node's name;
where they do not (no DNS for compute nodes, a hosts file that lists only the login node), its NodeAddr from
SLURM. gloo binds the address its own hostname resolves to, which is loopback or nothing on many nodes
(SLURM_MULTINODE.md pitfall 3), so each rank names the interface that carries its traffic to the master.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import subprocess
import sys


class RendezvousError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, for a single-node rendezvous (the local executor, tests, benchmarks).
    Another process may take it before the ranks bind it: launchers that see EADDRINUSE start again."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None, socket.AF_INET)
        return True
    except (socket.gaierror, UnicodeError):
        return False


def node_addr(node: str) -> str | None:
    """SLURM's NodeAddr of `node` (an IP on most clusters), or None when SLURM does not know it."""
    try:
        out = subprocess.run(["scontrol", "show", "-o", "node", node], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return fields.get("NodeAddr")


def master_address(first_node: str) -> str:
    """An address of the allocation's first node that this rank can reach: its name if that resolves here,
    else SLURM's NodeAddr for it. One line naming the node when neither works."""
    if resolves(first_node):
        return first_node
    addr = node_addr(first_node)
    if addr and resolves(addr):
        return addr
    raise RendezvousError(f"rendezvous: node {first_node!r} (the allocation's first) does not resolve on "
                          f"{socket.gethostname()} and SLURM gives no usable NodeAddr ({addr!r}); "
                          f"set MASTER_ADDR")


def _ipv4_of(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:  # SIOCGIFADDR
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_toward(host: str) -> str | None:
    """Name of the local interface whose address the kernel uses to reach `host` (no packet is sent)."""
    try:
        target = socket.getaddrinfo(host, 1, socket.AF_INET)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 1))  # UDP connect: only a route lookup
            local = sock.getsockname()[0]
    except OSError:
        return None
    if ipaddress.ip_address(local).is_loopback:
        return "lo" if _ipv4_of("lo") else None
    return next((name for _, name in socket.if_nameindex() if _ipv4_of(name) == local), None)


def bind_gloo_to_master_route(rank: int, master_addr: str, master_port: int) -> str | None:
    """Set GLOO_SOCKET_IFNAME to the interface toward the master unless the job/profile set it; returns it.
    Prints one line per rank (in its log): where it runs, whom it meets, which interface carries it."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME") or interface_toward(master_addr)
    if ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    print(f"rendezvous: rank {rank} on {socket.gethostname()} -> {master_addr}:{master_port}, gloo on "
          f"{ifname or 'its hostname address'} ({_ipv4_of(ifname) if ifname else '-'})", file=sys.stderr, flush=True)
    return ifname
