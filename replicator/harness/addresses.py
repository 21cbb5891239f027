"""Free loopback ports and one loopback address per node, for clusters on this machine."""

from __future__ import annotations

import socket

__all__ = ["free_port", "loopback_hosts"]


def free_port(host: str) -> int:
    """A port nothing listens on at ``host`` right now (the kernel's pick for port 0)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def loopback_hosts(count: int) -> list[str]:
    """127.0.0.1 to 127.0.0.N, one address per node as on real machines; all 127.0.0.1 where
    the other loopback addresses are not configured (macOS)."""
    try:
        for n in range(2, count + 1):
            free_port(f"127.0.0.{n}")
    except OSError:
        return ["127.0.0.1"] * count
    return [f"127.0.0.{n}" for n in range(1, count + 1)]
