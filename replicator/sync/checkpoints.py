"""Checkpoints: where replication stood (this node's vector, each peer's acknowledged
position), recorded every ``incremental.checkpoint_interval`` and on request, the newest
``max_checkpoints`` kept. They answer "how far had we got at 02:00?" after an incident."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from protocol import Origin
from replicator.capture.transactions import write_transaction

__all__ = ["list_checkpoints", "take_checkpoint"]


def take_checkpoint(
    conn: sqlite3.Connection,
    reason: str,
    vector: Mapping[Origin, int],
    peers: Mapping[str, Mapping[str, Any]],
    keep: int,
) -> dict[str, Any]:
    """Record one checkpoint and drop the oldest beyond ``keep``; ``conn`` in autocommit."""
    taken_at = time.time()
    vector_json = json.dumps({str(o): s for o, s in sorted(vector.items(), key=str)})
    peers_json = json.dumps(peers, sort_keys=True)
    with write_transaction(conn):
        ident = conn.execute(
            "INSERT INTO _repl_checkpoints (taken_at, reason, vector, peers)"
            " VALUES (?, ?, ?, ?) RETURNING id",
            (taken_at, reason, vector_json, peers_json),
        ).fetchone()[0]
        conn.execute(
            "DELETE FROM _repl_checkpoints WHERE id NOT IN"
            " (SELECT id FROM _repl_checkpoints ORDER BY id DESC LIMIT ?)",
            (keep,),
        )
    return _checkpoint(ident, taken_at, reason, vector_json, peers_json)


def list_checkpoints(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """The newest checkpoints first."""
    return [
        _checkpoint(*row)
        for row in conn.execute(
            "SELECT id, taken_at, reason, vector, peers FROM _repl_checkpoints"
            " ORDER BY id DESC LIMIT ?",
            (limit,),
        )
    ]


def _checkpoint(
    ident: int, taken_at: float, reason: str, vector: str, peers: str
) -> dict[str, Any]:
    return {
        "id": ident,
        "taken_at": taken_at,
        "reason": reason,
        "version_vector": json.loads(vector),
        "peers": json.loads(peers),
    }
