"""The application on each node: its own process, writing its node's file with plain sqlite3
at a steady rate until SIGTERM."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

__all__ = ["application_command", "writer_main"]

_CODE = (
    "import sys; from replicator.demo.application import writer_main; "
    "sys.exit(writer_main(sys.argv[1:]))"
)


def application_command(db: Path, node: int, rate: float, state: Path) -> list[str]:
    """The command line of node ``node``'s application; ``state`` keeps its count of writes."""
    return [sys.executable, "-c", _CODE, str(db), str(node), str(rate), str(state)]


def writer_main(argv: Sequence[str]) -> int:
    """One application process: leases handed out, renewed and released, DNS records for the
    hosts, each write its own transaction, at a steady rate, until SIGTERM. Keys carry the
    node number (macs 02:0N:..., addresses 10.N.x.y) so nodes never write the same row."""
    db, node_text, rate_text, state_path = argv
    node, rate, state_file = int(node_text), float(rate_text), Path(state_path)
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the demo decides when the application stops
    parent = os.getppid()
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {"writes": 0, "next": 0}
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = NORMAL")
    leases: deque[tuple[str, str, str]] = deque(
        conn.execute(
            "SELECT mac, ip, hostname FROM dhcp_leases WHERE mac LIKE ? ORDER BY rowid",
            (f"02:{node:02x}:%",),
        )
    )
    rng = random.Random()  # noqa: S311 (a workload, not a secret)
    due = saved = time.monotonic()
    while not stopping and os.getppid() == parent:
        _one_write(conn, rng, node, state, leases)
        state["writes"] += 1
        now = time.monotonic()
        if now - saved > 0.25:
            _save(state_file, state)
            saved = now
        due += 1 / rate
        if due > now:
            time.sleep(due - now)
        else:
            due = now  # fell behind (a busy disk): carry on at the rate, no burst
    _save(state_file, state)
    conn.close()
    return 0


def _one_write(
    conn: sqlite3.Connection,
    rng: random.Random,
    node: int,
    state: dict[str, int],
    leases: deque[tuple[str, str, str]],
) -> None:
    now = int(time.time())
    roll = rng.random()
    if len(leases) < 20 or roll < 0.4:
        n = state["next"]
        state["next"] = n + 1
        mac = f"02:{node:02x}:" + ":".join(f"{(n >> s) & 255:02x}" for s in (24, 16, 8, 0))
        ip = f"10.{node}.{n // 250 % 256}.{n % 250 + 1}"
        host = f"host-{node}-{n}"
        conn.execute(
            "INSERT INTO dhcp_leases (mac, ip, hostname, scope, expires, client_id)"
            " VALUES (?, ?, ?, 'lan', ?, ?)",
            (mac, ip, host, now + 3600, bytes.fromhex("01" + mac.replace(":", ""))),
        )
        leases.append((mac, ip, host))
    elif roll < 0.65:
        _, ip, host = rng.choice(leases)
        conn.execute(
            "INSERT INTO dns_records (name, type, zone, value, ttl, created_at, updated_at)"
            " VALUES (?, 'A', 'demo.lan', ?, 300, ?, ?) ON CONFLICT (name, type, zone)"
            " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (host, ip, now, now),
        )
    elif roll < 0.92:
        mac, _, _ = rng.choice(leases)
        conn.execute("UPDATE dhcp_leases SET expires = ? WHERE mac = ?", (now + 3600, mac))
    else:
        mac, _, _ = leases.popleft()
        conn.execute("DELETE FROM dhcp_leases WHERE mac = ?", (mac,))


def _save(path: Path, state: dict[str, int]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)
