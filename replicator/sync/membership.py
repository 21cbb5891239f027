"""Who may join: the settings every node must share, and the checks on a peer's Hello.

Two nodes that disagree on what is replicated or how conflicts are decided would diverge
silently, so they refuse each other at Hello, naming the setting that differs. The fingerprint
is a hash of those settings; the settings themselves travel beside it so the refusal can say
what differs rather than just "mismatch".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from protocol import Hello, Origin
from replicator.capture.tables import TableInfo
from replicator.config import ReplicationConfig
from replicator.errors import ReplicationError

__all__ = ["ClusterView", "HelloRefused", "check_hello", "fingerprint", "shared_settings"]


class HelloRefused(ReplicationError):
    """A peer's Hello does not let it in: unknown node id, or settings that differ."""


def shared_settings(
    replication: ReplicationConfig,
    tables: Mapping[str, TableInfo],
    filters: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The settings that must agree across the cluster, each as a canonical string."""
    conflicts = replication.conflict_resolution
    settings = {
        "cluster_id": replication.cluster_id,
        "strategy": conflicts.strategy,
        "priorities": json.dumps(dict(sorted(conflicts.priorities.items()))),
        "table_strategies": json.dumps(dict(sorted(conflicts.tables.items()))),
    }
    if filters:  # rows withheld or transformed: every node must see them the same way
        settings["filters"] = json.dumps(dict(sorted(filters.items())))
    for name in sorted(tables):
        info = tables[name]
        settings[f"table:{name}"] = json.dumps(
            {"columns": sorted(info.columns), "key": list(info.primary_key)}
        )
    return settings


def fingerprint(settings: Mapping[str, str]) -> bytes:
    canonical = json.dumps(dict(sorted(settings.items())), separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=32).digest()


def check_hello(
    hello: Hello,
    *,
    local_id: str,
    expected: Iterable[str],
    settings: Mapping[str, str],
) -> None:
    """Raise `HelloRefused` unless this Hello comes from a configured peer that agrees."""
    allowed = set(expected)
    if hello.node_id == local_id:
        raise HelloRefused(f"peer claims this node's own id {local_id!r}", op="hello")
    if hello.node_id not in allowed:
        raise HelloRefused(
            f"node {hello.node_id!r} is not a configured peer",
            op="hello",
            peer=hello.node_id,
            hint="add it to replication.peers on this node, or fix its node_id",
        )
    if hello.settings_fingerprint == fingerprint(settings):
        return
    differences = sorted(
        name
        for name in set(settings) | set(hello.settings)
        if settings.get(name) != hello.settings.get(name)
    )
    detail = "; ".join(
        f"{name}: here {settings.get(name, '(absent)')}, "
        f"there {hello.settings.get(name, '(absent)')}"
        for name in differences[:5]
    )
    raise HelloRefused(
        f"settings differ from node {hello.node_id!r}: {detail or 'fingerprint only'}",
        op="hello",
        peer=hello.node_id,
        hint="replicated tables, their columns and the conflict settings must match",
    )


class ClusterView:
    """What this node knows every node of the cluster holds, gossiped in heartbeats.

    Each entry is a node's version vector stamped with the wall time that node reported it;
    the freshest report wins, so a node that lost data (restored from a backup) is seen to
    hold less. Configured peers start with an empty vector: until they report, they hold
    nothing, and nothing may be forgotten on their account.

    Gossip is a peer's word, so the view takes only what it can bound: reports of its
    configured peers and of at most ``relayed_limit`` other nodes (in a chain, the nodes
    beyond the neighbours are known only through them). A report dated further in the
    future than ``max_clock_offset_ms`` is refused (it would win over every true one). Made-up
    names can therefore grow neither the view nor the heartbeats that carry it.
    """

    def __init__(
        self,
        node_id: str,
        peers: Iterable[str],
        *,
        max_clock_offset_ms: int = 60_000,
        relayed_limit: int = 0,
    ) -> None:
        self.node_id = node_id
        self._configured = frozenset(peers)
        self._known: dict[str, tuple[int, dict[Origin, int]]] = {
            peer: (0, {}) for peer in self._configured
        }
        self._max_offset_ms = max_clock_offset_ms
        self._relayed_limit = relayed_limit

    def snapshot(
        self, own_vector: Mapping[Origin, int], now_ms: int
    ) -> dict[str, tuple[int, dict[Origin, int]]]:
        return {**self._known, self.node_id: (now_ms, dict(own_vector))}

    def merge(self, known: Mapping[str, tuple[int, Mapping[Origin, int]]], now_ms: int) -> int:
        """Take the fresher reports of ``known``; returns how many were refused."""
        refused = 0
        relayed = len(self._known) - len(self._configured)
        for node, (reported_at, vector) in known.items():
            if node == self.node_id:
                continue
            if reported_at > now_ms + self._max_offset_ms:
                refused += 1
                continue
            current = self._known.get(node)
            if current is None:
                if relayed >= self._relayed_limit:
                    refused += 1
                    continue
                relayed += 1
            if current is None or reported_at > current[0]:
                self._known[node] = (reported_at, dict(vector))
        return refused

    def floor(self, own_vector: Mapping[Origin, int]) -> dict[Origin, int]:
        """Per origin, the sequence every known node holds (origins at 0 left out)."""
        floor = dict(own_vector)
        for _, vector in self._known.values():
            floor = {origin: min(seq, vector.get(origin, 0)) for origin, seq in floor.items()}
        return {origin: seq for origin, seq in floor.items() if seq > 0}

    def report_of(self, node: str) -> Mapping[Origin, int]:
        """The freshest vector ``node`` reported (empty when it never did)."""
        return self._known.get(node, (0, {}))[1]

    def nodes(self) -> list[str]:
        return sorted({self.node_id, *self._known})
