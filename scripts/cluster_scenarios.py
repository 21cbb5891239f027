#!/usr/bin/env python3
"""Fault scenarios against the docker-compose cluster, run by scripts/cluster-test.

Brings the three-node cluster up, and for each scenario runs an application-like writer in
every node's container (DHCP leases, and DNS records several nodes update at once) while a
fault is applied: none, a network partition, a SIGKILL and restart, a freeze past the liveness
timeout. Afterwards every node must report identical table checksums through its control API
(`replicator validate`), hold every row any writer committed, and have applied every change
once. Prints a summary table; exits 1 on any miss. Standard library only: it runs before, and
apart from, the project's own environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODES = ("node1", "node2", "node3")
SOCKET = "/run/replicator/control.sock"
DB = "/var/lib/replicator/state.db"
WRITE_SECONDS = 10.0
WRITE_RATE = 40.0  # commits per second per writer
CONVERGE_TIMEOUT = 90.0
LIVENESS_TIMEOUT = 3.0  # conf/compose/*.hcl sync.liveness_timeout

# An application: one committed lease per line printed (printed only once committed), and a
# DNS record from a small shared set updated now and then, so nodes update the same rows.
WRITER = """
import sqlite3, sys, time
tag, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
conn = sqlite3.connect(STATE_PATH, isolation_level=None, timeout=30)
conn.execute("PRAGMA busy_timeout = 30000")
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    key = f"{tag}-{i:06d}"
    conn.execute(
        "INSERT INTO dhcp_leases (mac, ip, hostname, expires) VALUES (?, ?, ?, ?)",
        (key, key, tag, int(time.time()) + 3600),
    )
    print(key, flush=True)
    if i % 10 == 0:
        conn.execute(
            "INSERT INTO dns_records (name, type, zone, value, ttl, updated_at)"
            " VALUES (?, 'A', 'example.', ?, 60, ?) ON CONFLICT (name, type, zone)"
            " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (f"host{i % 20}", tag, int(time.time() * 1000)),
        )
    i += 1
    time.sleep(1 / rate)
""".replace("STATE_PATH", repr(DB))

# What a node holds of a scenario's leases, and changes its log holds more than once.
READER = """
import json, sqlite3, sys
conn = sqlite3.connect(STATE_PATH, timeout=30)
keys = [k for (k,) in conn.execute(
    "SELECT mac FROM dhcp_leases WHERE mac LIKE ? || '%'", (sys.argv[1],))]
(twice,) = conn.execute(
    "SELECT count(*) FROM (SELECT 1 FROM _repl_log"
    " GROUP BY origin_node, origin_inc, origin_seq HAVING count(*) > 1)").fetchone()
print(json.dumps({"keys": keys, "applied_twice": twice}))
""".replace("STATE_PATH", repr(DB))


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


def say(text: str) -> None:
    print(f"[cluster-test {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Cluster:
    """The compose project: its containers, network and the docker commands on them."""

    def __init__(self, compose: list[str], project: str) -> None:
        self.compose = [*compose, "-p", project, "-f", str(ROOT / "docker-compose.yml")]
        self.project = project
        self._ids: dict[str, str] = {}

    def up(self) -> None:
        run([*self.compose, "build"], timeout=900)
        run([*self.compose, "up", "-d"], timeout=300)
        for node in NODES:
            self.wait_healthy(node)

    def down(self) -> None:
        run([*self.compose, "down", "-v", "--remove-orphans"], check=False, timeout=300)

    def logs(self) -> str:
        return run([*self.compose, "logs", "--no-color", "--tail", "40"], check=False)

    def container(self, node: str) -> str:
        if node not in self._ids:
            self._ids[node] = run([*self.compose, "ps", "-q", node]).strip()
        return self._ids[node]

    @property
    def network(self) -> str:
        return f"{self.project}_replication"

    def health(self, node: str) -> str:
        return run(["docker", "inspect", "-f", "{{.State.Health.Status}}", self.container(node)],
                   check=False).strip()  # fmt: skip

    def wait_healthy(self, node: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.health(node) != "healthy":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node} not healthy after {timeout:.0f}s")
            time.sleep(0.5)

    def exec(self, node: str, *cmd: str, check: bool = True) -> str:
        return run(["docker", "exec", self.container(node), *cmd], check=check)

    def writer(self, node: str, tag: str, seconds: float, out: Path) -> subprocess.Popen[bytes]:
        with out.open("ab") as sink:
            return subprocess.Popen(
                ["docker", "exec", self.container(node), "python3", "-c", WRITER, tag,
                 str(seconds), str(WRITE_RATE)],
                stdout=sink, stderr=subprocess.DEVNULL,
            )  # fmt: skip

    def holdings(self, node: str, prefix: str) -> tuple[set[str], int]:
        """The node's leases under ``prefix``, and how many changes its log holds twice."""
        found = json.loads(self.exec(node, "python3", "-c", READER, prefix))
        return set(found["keys"]), int(found["applied_twice"])

    def sees(self, node: str, peer: str) -> str:
        """The state of ``node``'s link to ``peer``, from its control API."""
        answer = run(["docker", "exec", self.container(node), "replicator", "peers",
                      "--socket", SOCKET, "--json"], check=False)  # fmt: skip
        try:
            peers = json.loads(answer)["peers"]
        except (ValueError, KeyError):
            return "unknown"
        return next((str(p["state"]) for p in peers if p["id"] == peer), "unknown")

    def wait_link(self, node: str, peer: str, up: bool, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.sees(node, peer) == "connected") == up:
                return True
            time.sleep(0.3)
        return False

    def consistent(self, node: str) -> bool:
        """The node's own answer: every table's checksum matches every peer's."""
        answer = run(["docker", "exec", self.container(node), "replicator", "validate",
                      "--socket", SOCKET, "--json"], check=False)  # fmt: skip
        try:
            return bool(json.loads(answer).get("consistent"))
        except ValueError:
            return False


@dataclass
class Outcome:
    scenario: str
    writes: int = 0
    converge_seconds: float | None = None
    lost: int = 0
    duplicated: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.converge_seconds is not None
            and not self.lost
            and not self.duplicated
            and not self.notes
        )


class Scenarios:
    def __init__(self, cluster: Cluster, work: Path) -> None:
        self.cluster = cluster
        self.work = work
        self.fault_missed: str | None = None  # the fault did not show as expected

    def run(
        self, name: str, fault: Callable[[dict[str, subprocess.Popen[bytes]]], None]
    ) -> Outcome:
        say(f"scenario {name}: writers on {', '.join(NODES)}")
        self.fault_missed = None
        writers = {
            node: self.cluster.writer(node, f"{name}-{node}", WRITE_SECONDS, self._out(name, node))
            for node in NODES
        }
        fault(writers)
        for process in writers.values():
            process.wait(timeout=WRITE_SECONDS + 120)
        return self._check(name)

    def _out(self, name: str, node: str) -> Path:
        return self.work / f"{name}-{node}.keys"

    def _check(self, name: str) -> Outcome:
        outcome = Outcome(name)
        if self.fault_missed:
            outcome.notes.append(self.fault_missed)
        written: set[str] = set()
        for path in self.work.glob(f"{name}-*.keys"):
            written |= {line for line in path.read_text().split() if line}
        outcome.writes = len(written)
        started = time.monotonic()
        held: dict[str, set[str]] = {}
        while time.monotonic() - started < CONVERGE_TIMEOUT:
            held = {node: self.cluster.holdings(node, f"{name}-")[0] for node in NODES}
            same = all(keys == held[NODES[0]] for keys in held.values())
            if same and written <= held[NODES[0]] and all(map(self.cluster.consistent, NODES)):
                outcome.converge_seconds = time.monotonic() - started
                break
            time.sleep(0.5)
        else:
            outcome.notes.append(f"did not converge within {CONVERGE_TIMEOUT:.0f}s")
        outcome.lost = len({key for keys in held.values() for key in written - keys})
        outcome.duplicated = sum(self.cluster.holdings(node, f"{name}-")[1] for node in NODES)
        say(f"scenario {name}: {outcome.writes} writes, "
            + ("converged" if outcome.converge_seconds is not None else "NOT converged")
            + f", lost {outcome.lost}, duplicated {outcome.duplicated}")  # fmt: skip
        return outcome

    # -- the faults ------------------------------------------------------------------------

    def steady(self, writers: dict[str, subprocess.Popen[bytes]]) -> None:
        """No fault: replication under a steady load."""

    def partition(self, writers: dict[str, subprocess.Popen[bytes]]) -> None:
        """node3 cut off from the others while everyone writes, then reconnected."""
        time.sleep(2)
        cid = self.cluster.container("node3")
        run(["docker", "network", "disconnect", self.cluster.network, cid])
        say("node3 disconnected from the network")
        started = time.monotonic()
        if not self.cluster.wait_link("node1", "node3", up=False, timeout=LIVENESS_TIMEOUT + 5):
            self.fault_missed = "node1 never saw node3 go"
        say(f"node1 sees node3 gone after {time.monotonic() - started:.1f}s")
        time.sleep(max(3.0, WRITE_SECONDS / 2 - (time.monotonic() - started)))
        run(["docker", "network", "connect", "--alias", "node3", self.cluster.network, cid])
        say("node3 reconnected")

    def kill(self, writers: dict[str, subprocess.Popen[bytes]]) -> None:
        """node2 killed (SIGKILL, its writer with it), then started again, writing again."""
        time.sleep(3)
        cid = self.cluster.container("node2")
        run(["docker", "kill", cid])
        say("node2 killed")
        writers["node2"].wait(timeout=30)
        time.sleep(2)
        run(["docker", "start", cid])
        self.cluster.wait_healthy("node2")
        say("node2 restarted and healthy")
        if not self.cluster.wait_link("node1", "node2", up=True, timeout=15):
            self.fault_missed = "node2 did not reconnect to node1"
        writers["node2"] = self.cluster.writer("node2", "kill-node2-again", 3.0,
                                               self._out("kill", "node2-again"))  # fmt: skip

    def pause(self, writers: dict[str, subprocess.Popen[bytes]]) -> None:
        """node1 frozen past the liveness timeout, then thawed."""
        time.sleep(2)
        cid = self.cluster.container("node1")
        run(["docker", "pause", cid])
        say(f"node1 paused for {2 * LIVENESS_TIMEOUT + 1:.0f}s")
        started = time.monotonic()
        if not self.cluster.wait_link("node2", "node1", up=False, timeout=LIVENESS_TIMEOUT + 5):
            self.fault_missed = "node2 never timed node1 out"
        say(f"node2 timed node1 out after {time.monotonic() - started:.1f}s")
        time.sleep(max(0.0, 2 * LIVENESS_TIMEOUT + 1 - (time.monotonic() - started)))
        run(["docker", "unpause", cid])
        say("node1 unpaused")


def table(outcomes: Sequence[Outcome]) -> str:
    rows = [("SCENARIO", "WRITES", "CONVERGED IN", "LOST", "DUPLICATED", "RESULT")]
    for o in outcomes:
        took = "-" if o.converge_seconds is None else f"{o.converge_seconds:.1f}s"
        rows.append((o.scenario, str(o.writes), took, str(o.lost), str(o.duplicated),
                     "ok" if o.ok else "MISS " + "; ".join(o.notes)))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) if 0 < i < 5 else cell.ljust(w) for i, (cell, w) in
                  enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--compose",
        default=os.environ.get("COMPOSE", "docker-compose"),
        help="the compose command (docker-compose, or 'docker compose')",
    )
    parser.add_argument("--project", default="replicator-test")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    args = parser.parse_args(argv)
    cluster = Cluster(shlex.split(args.compose), args.project)
    work = ROOT / ".cluster-test" / "run"
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("*.keys"):
        old.unlink()
    scenarios = Scenarios(cluster, work)
    outcomes: list[Outcome] = []
    failed = False
    try:
        cluster.down()  # what an interrupted earlier run left
        say("building the image and starting node1..node3")
        cluster.up()
        say("all three nodes healthy")
        for name, fault in (
            ("steady", scenarios.steady),
            ("partition", scenarios.partition),
            ("kill", scenarios.kill),
            ("pause", scenarios.pause),
        ):
            outcomes.append(scenarios.run(name, fault))
    except Exception as error:
        failed = True
        say(f"stopped: {error}")
    finally:
        if failed or not all(o.ok for o in outcomes):
            print(cluster.logs(), flush=True)
        if args.keep:
            say(f"cluster left up (--keep): {shlex.join(cluster.compose)} down -v")
        else:
            cluster.down()
            say("cluster removed (containers, network, volumes)")
    print()
    print(table(outcomes))
    return 1 if failed or not outcomes or not all(o.ok for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
