"""What a node is given besides its configuration: timing knobs tests may tighten, and the
seams a test or a simulation replaces (network, clock, random source)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from replicator.clock import Clock, SystemClock
from replicator.sync.link import LinkSettings
from replicator.sync.network import Network, TcpNetwork

__all__ = ["NodeOptions"]


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """Defaults suit production."""

    handshake_timeout: float = 5.0
    hello_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    link: LinkSettings = field(default_factory=LinkSettings)
    max_handshakes: int = 64
    """Incoming connections allowed between accept and Hello, in all."""
    max_handshakes_per_source: int = 8
    """The same, from one source address."""
    log_interval: float = 30.0
    """Repeated log lines of one kind (refused connections, failed dials) at most this often."""
    network: Network = field(default_factory=TcpNetwork)
    """Where the node listens and dials: TCP, or in-memory streams in a test."""
    clock: Clock = field(default_factory=SystemClock)
    """What the node times and stamps with: the system's, or a simulated one."""
    rng: random.Random = field(default_factory=random.Random)
    """The jitter of redials and the ids of snapshots, seeded where a run must replay."""
