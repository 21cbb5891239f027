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

from protocol import Hello
from replicator.config import ReplicationConfig
from replicator.errors import ReplicationError
from replicator.tables import TableInfo

__all__ = ["HelloRefused", "check_hello", "fingerprint", "shared_settings"]


class HelloRefused(ReplicationError):
    """A peer's Hello does not let it in: unknown node id, or settings that differ."""


def shared_settings(
    replication: ReplicationConfig, tables: Mapping[str, TableInfo]
) -> dict[str, str]:
    """The settings that must agree across the cluster, each as a canonical string."""
    conflicts = replication.conflict_resolution
    settings = {
        "cluster_id": replication.cluster_id,
        "strategy": conflicts.strategy,
        "priorities": json.dumps(dict(sorted(conflicts.priorities.items()))),
        "table_strategies": json.dumps(dict(sorted(conflicts.tables.items()))),
    }
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
