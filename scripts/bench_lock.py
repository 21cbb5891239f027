#!/usr/bin/env python3
"""How long replication keeps the application's writers waiting: SQLite has one write lock.

Real `replicator run` processes on 127.0.0.1 / 127.0.0.2; the application is a separate
process committing single-row transactions on node2's file at --rate commits/s through a plain
sqlite3 connection with Python's default 5 s busy timeout, recording each commit's latency
(BEGIN IMMEDIATE to COMMIT returned) and each failure ("database is locked").

Phases, each with fresh nodes:
1. catch-up: --rows leases committed on node1 while node2 is down (1,000-row transactions);
   node2 starts and applies them all while its application writes.
2. steady: node1's own application commits single rows at --rate while node2's does too.
3. frozen: as 1, and node2's replicator is SIGSTOPped for --freeze seconds mid catch-up.

Printed per phase: the application's commit latency (p50, p99, max, failures) and node2's
own write transactions as its status reports them (count, p50, p99, max). Figures are this
machine's, this run's.

    scripts/bench_lock.py [--rows N] [--rate R] [--seconds S] [--freeze S]
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from replicator.harness import NodeProcess, wait_until  # noqa: E402


def app_writer(path: str, rate: float, seconds: float, prefix: str, out: Any) -> None:
    """Single-row commits at ``rate``/s for ``seconds``; sends (latencies, failures)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)  # Python's default
    latencies: list[float] = []
    failures = 0
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) - start < seconds:
        due = start + n / rate
        if due > now:
            time.sleep(due - now)
        n += 1
        began = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, 1)",
                (f"{prefix}{n}", f"{prefix}-ip-{n}"),
            )
            conn.execute("COMMIT")
            latencies.append(time.perf_counter() - began)
        except sqlite3.OperationalError:
            failures += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    conn.close()
    out.send((latencies, failures))
    out.close()


def bulk(node: NodeProcess, rows: int) -> None:
    with node.app() as app:
        for first in range(0, rows, 1000):
            app.execute("BEGIN")
            app.executemany(
                "INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, 1)",
                [(f"bulk{n}", f"bulk-ip-{n}") for n in range(first, min(rows, first + 1000))],
            )
            app.execute("COMMIT")


def start_app(node: NodeProcess, rate: float, seconds: float, prefix: str) -> tuple[Any, Any]:
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(
        target=app_writer, args=(str(node.db_path), rate, seconds, prefix, send)
    )
    process.start()
    return process, receive


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def report(name: str, latencies: list[float], failures: int, lock: dict[str, Any]) -> None:
    ms = [value * 1000 for value in latencies]
    print(
        f"{name:<10} app commits {len(ms):>6}  p50 {percentile(ms, 0.5):7.2f} ms  "
        f"p99 {percentile(ms, 0.99):7.2f} ms  max {max(ms, default=0):8.2f} ms  "
        f"failed {failures:>4}   |  node2 transactions {lock.get('transactions', 0):>6}  "
        f"p50 {lock.get('p50_ms') or 0:6.2f} ms  p99 {lock.get('p99_ms') or 0:6.2f} ms  "
        f"max {lock.get('max_ms') or 0:7.2f} ms",
        flush=True,
    )


def phase(root: Path, name: str, args: argparse.Namespace) -> None:
    directory = root / name
    node1 = NodeProcess(directory, "node1", "127.0.0.1")
    node2 = NodeProcess(directory, "node2", "127.0.0.2")
    try:
        node1.start([node2])
        node1.app().close()
        if name in ("catch-up", "frozen"):
            bulk(node1, args.rows)
        node2.start([node1])
        node2.app().close()
        app, results = start_app(node2, args.rate, args.seconds, "app")
        source = source_results = None
        if name == "steady":
            source, source_results = start_app(node1, args.rate, args.seconds, "one")
        if name == "frozen":
            time.sleep(1.0)
            assert node2.process is not None
            node2.process.send_signal(signal.SIGSTOP)
            time.sleep(args.freeze)
            node2.process.send_signal(signal.SIGCONT)
        latencies, failures = results.recv()
        app.join()
        if source is not None and source_results is not None:
            source_results.recv()  # its pipe must be read for it to finish
            source.join()
        if name != "steady":
            wait_until(lambda: node2.count("dhcp_leases") >= args.rows, 300, "the catch-up")
        report(name, latencies, failures, node2.status().get("write_lock") or {})
    finally:
        for node in (node1, node2):
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--freeze", type=float, default=3.0)
    args = parser.parse_args()
    print(f"catch-up of {args.rows} rows; application at {args.rate:g} commits/s for "
          f"{args.seconds:g} s; freeze {args.freeze:g} s", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-lock-") as root:
        for name in ("catch-up", "steady", "frozen"):
            phase(Path(root), name, args)


if __name__ == "__main__":
    main()
