"""The live view: per node its state, rows, application rate and conflicts, and under it one
line per link with its state, lag and change rates."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from replicator.demo.cluster import DemoCluster

__all__ = ["LiveView"]


@dataclass
class _Rates:
    """Changes per second from counter deltas over the last couple of seconds."""

    samples: dict[tuple[str, ...], deque[tuple[float, int]]] = field(default_factory=dict)

    def rate(self, key: tuple[str, ...], value: int, now: float) -> float:
        window = self.samples.setdefault(key, deque())
        if window and value < window[-1][1]:
            window.clear()  # the counter restarted with its node
        window.append((now, value))
        while len(window) > 2 and now - window[0][0] > 2.5:
            window.popleft()
        (t0, v0), (t1, v1) = window[0], window[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0


class LiveView:
    def __init__(self, cluster: DemoCluster) -> None:
        self.cluster = cluster
        self.started = time.monotonic()
        self.rates = _Rates()

    def lines(self) -> list[str]:
        now = time.monotonic()
        nodes = self.cluster.nodes
        total = sum(n.writes() for n in nodes)
        lines = [
            f"live view at {now - self.started:5.1f} s     application writes so far: {total:,}"
        ]
        for node in nodes:
            status = node.try_status()
            if not node.running:
                state = "DOWN"
            elif status is None:
                state = "starting"
            else:
                state = "paused" if status.get("paused") else "up"
            counts = node.counts()
            rows = (
                "-" if counts is None else f"{counts['dhcp_leases']:6,} {counts['dns_records']:6,}"
            )
            app = "app stopped"
            if node.writer is not None and node.writer.poll() is None:
                app = f"app {self.rates.rate((node.node_id, ''), node.writes(), now):4.0f} w/s"
            conflicts = node.conflicts()
            lines.append(
                f"{node.node_id}  {state:8}  leases/dns {rows}  {app:13}  conflicts "
                + ("-" if conflicts is None else str(conflicts))
            )
            for peer in (status or {}).get("peers", []):
                key = (node.node_id, str(peer["id"]))
                sent = self.rates.rate((*key, "sent"), int(peer["changes_sent"]), now)
                got = self.rates.rate((*key, "got"), int(peer["changes_received"]), now)
                lines.append(
                    f"   -> {peer['id']}  {peer['state']:12}  lag {peer['lag_changes']:6,} changes"
                    f" {float(peer['lag_seconds']):5.1f} s   out {sent:4.0f}/s  in {got:4.0f}/s"
                )
            for alarm in (status or {}).get("alarms", []):
                lines.append(f"   alarm: {alarm}")
        return lines
