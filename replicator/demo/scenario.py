"""The demo's story, told as it runs: the mesh connects, the applications write, a conflict
is provoked and settled, a node crashes and catches up, then the three files are proven equal."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from replicator.capture.hlc import physical_ms
from replicator.demo.cluster import DemoCluster, DemoError, vector
from replicator.demo.interrupts import Interrupts
from replicator.demo.nodes import TABLES
from replicator.demo.screen import REFRESH, Screen
from replicator.demo.view import LiveView

__all__ = ["FULL", "SHORT", "Demo", "Pace"]

CONFLICT_MAC = "02:00:00:00:00:99"


@dataclass(frozen=True, slots=True)
class Pace:
    """How long each act lasts: ``SHORT`` keeps CI under half a minute."""

    rate: float  # writes per second, per application
    warmup: float
    paused: float  # how long node2's replication stays paused for the conflict
    outage: float  # how long node3 stays dead
    after: float
    converge_timeout: float
    plain_every: float  # seconds between views when stdout is not a terminal


SHORT = Pace(rate=60, warmup=3, paused=1, outage=3, after=2, converge_timeout=20, plain_every=2)
FULL = Pace(rate=100, warmup=15, paused=3, outage=15, after=10, converge_timeout=60, plain_every=5)


def _origin_node(origin: str) -> str:
    return origin.partition("#")[0]


def _clock(stamp: int) -> str:
    ms = physical_ms(stamp)
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


class Demo:
    def __init__(self, root: Path, pace: Pace, out: TextIO, interrupts: Interrupts) -> None:
        self.pace = pace
        self.screen = Screen(out, pace.plain_every)
        self.cluster = DemoCluster(root, interrupts)
        self.view = LiveView(self.cluster)
        self.conflict_note = "not provoked"
        self.conflict_winner = ""
        self.outage_note = "not run"

    # -- watching -------------------------------------------------------------------------------

    def watch(
        self, seconds: float, until: Callable[[], bool] | None = None, what: str = ""
    ) -> float:
        """Refresh the live view for ``seconds`` or until ``until()``; returns the time taken.
        With ``what``, running out of time is an error."""
        start = time.monotonic()
        while True:
            self.refresh()
            if until is not None and until():
                return time.monotonic() - start
            if time.monotonic() - start >= seconds:
                if what:
                    raise DemoError(f"timed out after {seconds:.0f} s waiting for {what}")
                return time.monotonic() - start
            time.sleep(REFRESH)

    def refresh(self) -> None:
        self.screen.show(self.view.lines())

    # -- the acts -----------------------------------------------------------------------------

    def run(self) -> bool:
        tell, pace = self.screen.tell, self.pace
        tell(f"replicator demo: three nodes on this machine, their files in {self.cluster.root}")
        self.cluster.setup()
        tell(
            "Each node is a `replicator run` process with its own SQLite file. They reach each "
            "other over TCP (a full mesh), encrypted and authenticated with a freshly generated "
            "cluster key."
        )
        for node in self.cluster.nodes:
            self.cluster.start_node(node)
            tell(f"started {node.node_id} on {node.host}:{node.port}", 2)
        self.watch(30, self.cluster.mesh_connected, "the three nodes to connect")
        tell("All three nodes are connected to each other.")
        self.screen.say()
        tell(
            "Starting an application on each node: it hands out DHCP leases and DNS records, "
            f"about {pace.rate:.0f} writes/s, into its own node's file with plain sqlite3. "
            "replicator captures every write and ships it to the other two nodes."
        )
        tell(
            "The live view below shows, per node, its rows (leases/dns), its application's "
            "writes/s and the conflicts it has counted; under each node, one line per peer: the "
            "link's state, its lag (changes the peer has not acknowledged yet, and seconds) and "
            "the changes/s going out to and coming in from that peer."
        )
        for node in self.cluster.nodes:
            self.cluster.start_writer(node, pace.rate)
        self.watch(pace.warmup)
        self.conflict()
        self.watch(pace.warmup / 2)
        self.crash()
        self.watch(pace.after)
        return self.verify()

    def conflict(self) -> None:
        tell = self.screen.tell
        node1, node2 = self.cluster.nodes[:2]
        self.screen.say()
        tell(
            f"Conflict: one client (MAC {CONFLICT_MAC}) has its lease changed on node1 AND on "
            "node2 at the same moment."
        )
        node1.app_write(
            "INSERT INTO dhcp_leases (mac, ip, hostname, expires) VALUES (?, '10.0.0.99', ?, ?)",
            (CONFLICT_MAC, "printer", int(time.time()) + 3600),
        )
        self.watch(
            15,
            lambda: all(n.lease(CONFLICT_MAC) == "printer" for n in self.cluster.nodes),
            "the lease to reach every node",
        )
        tell(
            "The lease (hostname 'printer') is on all three nodes. Pausing node2's replication, "
            "so that node1 and node2 cannot hear of each other's write ...",
            2,
        )
        node2.client().post("/api/replication/pause")
        update = "UPDATE dhcp_leases SET hostname = ?, expires = ? WHERE mac = ?"
        expires = int(time.time()) + 7200
        stamp1 = node1.app_write(update, ("printer-lobby", expires, CONFLICT_MAC))
        time.sleep(0.015)
        stamp2 = node2.app_write(update, ("printer-office", expires, CONFLICT_MAC))
        apart = abs(physical_ms(stamp2) - physical_ms(stamp1))
        self.screen.say(f"  node1 wrote hostname 'printer-lobby'  at {_clock(stamp1)}")
        self.screen.say(f"  node2 wrote hostname 'printer-office' at {_clock(stamp2)}")
        self.watch(self.pace.paused)
        self.screen.say(f"  now {self.lease_line()}")
        node2.client().post("/api/replication/resume")
        tell("Resumed node2's replication: both versions now travel to every node.", 2)
        winner, loser = (node2, node1) if stamp2 > stamp1 else (node1, node2)
        kept = "printer-office" if winner is node2 else "printer-lobby"
        agreed = self.watch(
            15,
            lambda: all(n.lease(CONFLICT_MAC) == kept for n in self.cluster.nodes),
            "the two writes to settle",
        )
        self.screen.say(f"  {agreed:.1f} s later {self.lease_line()}")
        # The value can settle on a node before it has applied (and counted) the losing write.
        self.watch(5, lambda: all((n.conflicts() or 0) > 0 for n in self.cluster.nodes))
        counted = ", ".join(f"{n.node_id} {n.conflicts() or 0}" for n in self.cluster.nodes)
        tell(
            f"Why: the strategy is 'timestamp': the newest write wins, by hybrid logical clock "
            f"(the node id breaks an exact tie). {winner.node_id}'s write is {apart} ms newer than "
            f"{loser.node_id}'s, so every node keeps '{kept}', whichever order the two versions "
            f"reached it in. Conflicts counted: {counted}.",
            2,
        )
        self.conflict_note = f"one lease written on node1 and node2 {apart} ms apart"
        self.conflict_winner = f"{winner.node_id}'s newer '{kept}' kept on all three"

    def lease_line(self) -> str:
        return "   ".join(
            f"{n.node_id}: {n.lease(CONFLICT_MAC) or '?'}" for n in self.cluster.nodes
        )

    def crash(self) -> None:
        tell = self.screen.tell
        node1, node2, node3 = self.cluster.nodes
        self.screen.say()
        tell(
            "Crash: node3's replicator is killed with SIGKILL (no goodbye, nothing flushed) and "
            "its application stops with it. node1 and node2 carry on writing; what node3 misses "
            "waits in their change logs."
        )
        before = self.cluster.vector_of(node3)
        self.cluster.stop_writers([node3])
        self.cluster.children.stop([node3.process] if node3.process else [], signal.SIGKILL)
        self.watch(self.pace.outage)
        target: dict[str, int] = {}
        for node in (node1, node2):
            for origin, seq in self.cluster.vector_of(node).items():
                if _origin_node(origin) != node3.node_id:
                    target[origin] = max(target.get(origin, 0), seq)
        missed = sum(seq - before.get(origin, 0) for origin, seq in target.items())
        tell(f"Restarting node3: it missed {missed:,} changes while it was down.")
        restarted = time.monotonic()
        self.cluster.start_node(node3)
        answered: list[float] = []

        def caught_up() -> bool:
            self.cluster.check_alive(node3)
            status = node3.try_status()
            if status is None:
                return False
            if not answered:
                answered.append(time.monotonic() - restarted)
            have = vector(status["version_vector"])
            return all(have.get(origin, 0) >= seq for origin, seq in target.items())

        self.watch(60, caught_up, "node3 to catch up")
        took = time.monotonic() - restarted
        self.cluster.start_writer(node3, self.pace.rate)
        tell(
            f"node3 answered on its control socket {answered[0]:.1f} s after the restart, and "
            f"held all {missed:,} missed changes {took:.1f} s after the restart (start-up "
            "included). Its application is running again.",
            2,
        )
        self.outage_note = f"{missed:,} changes missed, caught up {took:.1f} s after the restart"

    # -- the proof ------------------------------------------------------------------------------

    def verify(self) -> bool:
        self.screen.say()
        self.screen.tell(
            "Stopping the applications, then checking that all three nodes hold the same data: "
            "identical table checksums at the same version vector, as the nodes report them, "
            "and identical table contents, read from the three SQLite files."
        )
        self.cluster.stop_writers(self.cluster.nodes)
        started = time.monotonic()
        try:
            self.watch(
                self.pace.converge_timeout,
                lambda: self.cluster.checksums_agree() and self.cluster.files_agree(),
                "convergence",
            )
            converged = True
        except DemoError:
            converged = False
        took = time.monotonic() - started
        self.screen.show(self.view.lines(), final=True)
        self.screen.close()
        self.summary(converged, took)
        return converged

    def summary(self, converged: bool, took: float) -> None:
        say = self.screen.say
        say()
        say("Summary")
        say("  rows           " + "".join(f"{n.node_id:>9}" for n in self.cluster.nodes))
        for table in TABLES:
            cells = []
            for node in self.cluster.nodes:
                try:
                    cells.append(f"{node.table_digest(table)[0]:>9,}")
                except sqlite3.Error:
                    cells.append(f"{'?':>9}")
            say(f"  {table:13}" + "".join(cells))
        writes = [n.writes() for n in self.cluster.nodes]
        per_node = ", ".join(
            f"{n.node_id} {w:,}" for n, w in zip(self.cluster.nodes, writes, strict=True)
        )
        say(f"  writes made    {sum(writes):,} ({per_node})")
        counted = ", ".join(f"{n.node_id} {n.conflicts() or 0}" for n in self.cluster.nodes)
        say(f"  conflicts      {self.conflict_note}")
        if self.conflict_winner:
            say(f"                 {self.conflict_winner}")
        say(f"                 counted by each node: {counted}")
        say(f"  crash          {self.outage_note}")
        if converged:
            say(f"  converged      yes, {took:.1f} s after the applications stopped")
        else:
            checksums = "agree" if self.cluster.checksums_agree() else "differ"
            files = "agree" if self.cluster.files_agree() else "differ"
            say(
                f"  converged      NO: {took:.0f} s after the applications stopped, checksums "
                f"{checksums}, file contents {files}"
            )
