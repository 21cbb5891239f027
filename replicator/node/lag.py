"""How far behind each peer is, in seconds, and the ``max_lag`` alarm raised while a peer
stays behind for longer than the configuration allows."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio

from protocol import Origin
from replicator.clock import Clock
from replicator.log import KEY_PEER, get_logger
from replicator.node.alarms import Alarms
from replicator.node.vectors import VectorCache
from replicator.sync.link import Link, PeerStatus
from replicator.sync.membership import ClusterView

__all__ = ["LagWatch"]

_log = get_logger("node")


class LagWatch:
    def __init__(
        self,
        *,
        peers: Mapping[str, object],
        links: Mapping[str, Link],
        status: Mapping[str, PeerStatus],
        cluster: ClusterView,
        vectors: VectorCache,
        log_end: Callable[[], int],
        alarms: Alarms,
        max_lag: float,
        clock: Clock,
    ) -> None:
        self._peers = peers
        self._links = links
        self._status = status
        self._cluster = cluster
        self._vectors = vectors
        self._log_end = log_end
        self._alarms = alarms
        self._max_lag = max_lag
        self._clock = clock
        self._lacking_since: dict[str, float] = {}  # peers not connected and missing changes

    async def run(self) -> None:
        """Raise (and log) an alarm while a peer leaves a batch unacknowledged past max_lag."""
        max_lag = self._max_lag
        while True:
            for peer_id in self._peers:
                lag = self.seconds(peer_id)
                name = f"max_lag:{peer_id}"
                if lag > max_lag:
                    message = (
                        f"{peer_id} has not acknowledged for {lag:.1f}s (max_lag {max_lag:g}s)"
                    )
                    if self._alarms.sound(name, message):
                        _log.warning("replication lag above max_lag", lag_seconds=round(lag, 1),
                                     max_lag=max_lag, **{KEY_PEER: peer_id})  # fmt: skip
                elif self._alarms.silence(name):
                    _log.info("replication lag back under max_lag", **{KEY_PEER: peer_id})
            await trio.sleep(min(1.0, max_lag / 2))

    def log_moved(self) -> None:
        """The log grew: the lag of a peer that is down starts now, if it lacks something."""
        if len(self._links) < len(self._peers):
            for peer_id in self._peers.keys() - self._links.keys():
                self.seconds(peer_id)

    def seconds(self, peer_id: str) -> float:
        """How long the peer has been missing changes: while connected, the oldest batch it
        is not known to hold; while not, since this node first saw it lacking something it
        holds (by what the peer last said it holds, itself or through gossip)."""
        link = self._links.get(peer_id)
        if link is not None:
            self._lacking_since.pop(peer_id, None)
            return link.lag_seconds
        if self._log_end() <= self._status[peer_id].acked_position or not self._lacks(peer_id):
            self._lacking_since.pop(peer_id, None)
            return 0.0
        now = self._clock.monotonic()
        return now - self._lacking_since.setdefault(peer_id, now)

    def _lacks(self, peer_id: str) -> bool:
        status = self._status[peer_id]
        reported = self._cluster.report_of(peer_id)
        own = Origin(peer_id, status.incarnation) if status.incarnation is not None else None
        for origin, seq in self._vectors.held.items():
            if origin != own and seq > max(
                status.peer_vector.get(origin, 0), reported.get(origin, 0)
            ):
                return True
        return False
