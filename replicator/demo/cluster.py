"""`replicator demo`: three nodes on this machine, an application writing on each, a conflict, a
crash and a recovery, then proof that all three hold the same data.

It is the first thing a new user runs, so everything in it is real: separate ``replicator run``
processes talking over TCP with a generated key, applications that write their SQLite files
with plain ``sqlite3`` in their own processes, and a live view read only through what an
operator has (each node's control socket, and the files). Whatever happens (Ctrl-C, an error,
a crash of the demo itself on Linux) no process is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from replicator.capture.hlc import physical_ms
from replicator.errors import ReplicationError
from replicator.ops.client import ControlClient

__all__ = ["run_demo"]

NODES = 3
TABLES = {"dhcp_leases": "mac", "dns_records": "name, type, zone"}  # table: ORDER BY (its key)
CONFLICT_MAC = "02:00:00:00:00:99"
EXAMPLE_SCHEMA = Path(__file__).resolve().parent.parent / "conf" / "schema.sql"
# The tables the demo writes, for an installed copy without conf/ (same as conf/schema.sql).
FALLBACK_SCHEMA = """\
CREATE TABLE IF NOT EXISTS dhcp_leases (
    mac TEXT PRIMARY KEY, ip TEXT NOT NULL UNIQUE, hostname TEXT,
    scope TEXT NOT NULL DEFAULT 'lan', expires INTEGER NOT NULL, client_id BLOB);
CREATE TABLE IF NOT EXISTS dns_records (
    name TEXT NOT NULL, type TEXT NOT NULL, zone TEXT NOT NULL, value TEXT NOT NULL,
    ttl INTEGER NOT NULL DEFAULT 300, created_at INTEGER, updated_at INTEGER,
    PRIMARY KEY (name, type, zone)) WITHOUT ROWID;
"""
STOP_DEADLINE = 6.0  # seconds a child gets after SIGTERM before SIGKILL
SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 104-108 bytes


class DemoError(ReplicationError):
    """The demo cannot go on (a node did not start, a step timed out): said, then cleaned up."""


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
REFRESH = 0.5
WRITER_CODE = (
    "import sys; from replicator.demo.cluster import _writer_main; "
    "sys.exit(_writer_main(sys.argv[1:]))"
)


# ---------------------------------------------------------------------------------------------
# Children: every process the demo starts is registered, so cleanup can end them all.


class _Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP become KeyboardInterrupt, but never between starting a child
    and registering it (it would be left behind), nor during cleanup (it would be cut short)."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False
        self.saved: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self.saved[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        self.saved.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the demo dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Children:
    def __init__(self, interrupts: _Interrupts) -> None:
        self.interrupts = interrupts
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path, *, own_group: bool) -> subprocess.Popen[bytes]:
        with self.interrupts.deferred(), log.open("ab") as out:
            process = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # Writers stay out of the terminal's process group: the demo stops them itself.
                process_group=0 if own_group else None,
                # The demo starts no threads, so running code between fork and exec is safe.
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
            self.processes.append(process)
        return process

    def stop(self, processes: Sequence[subprocess.Popen[bytes]], sig: int = signal.SIGTERM) -> None:
        """Signal, wait up to STOP_DEADLINE, then SIGKILL whatever is still there."""
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)
        deadline = time.monotonic() + STOP_DEADLINE
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_all(self) -> None:
        self.stop(self.processes)


# ---------------------------------------------------------------------------------------------
# Nodes and applications


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _hosts() -> list[str]:
    """127.0.0.1-3, one address per node as on real machines; all 127.0.0.1 where the other
    loopback addresses are not configured (macOS)."""
    try:
        for n in range(2, NODES + 1):
            free_port(f"127.0.0.{n}")
    except OSError:
        return ["127.0.0.1"] * NODES
    return [f"127.0.0.{n}" for n in range(1, NODES + 1)]


def _hcl(text: str) -> str:
    return json.dumps(text)


@dataclass
class DemoNode:
    number: int
    host: str
    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    writer: subprocess.Popen[bytes] | None = None

    @property
    def id(self) -> str:
        return f"node{self.number}"

    @property
    def config(self) -> Path:
        return self.directory / "node.hcl"

    @property
    def db(self) -> Path:
        return self.directory / "state.db"

    @property
    def socket(self) -> Path:
        return self.directory / "control.sock"

    @property
    def writer_state(self) -> Path:
        return self.directory / "app.json"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> ControlClient:
        return ControlClient(str(self.socket), timeout=3.0)

    def status(self) -> dict[str, Any] | None:
        """The node's status, or None while it is down or not answering yet."""
        if not self.running:
            return None
        try:
            reply = self.client().get("/api/replication/status")
        except ReplicationError:
            return None
        return reply if isinstance(reply, dict) else None

    def write_config(self, nodes: list[DemoNode], key_file: Path, schema: Path) -> None:
        peers = ",\n".join(
            f"    {{ id = {_hcl(p.id)}, address = {_hcl(f'{p.host}:{p.port}')} }}"
            for p in nodes
            if p is not self
        )
        self.config.write_text(
            f"""\
# Written by `replicator demo`: {self.id} of a three-node full mesh on this machine.
state {{
  path   = "state.db"
  schema = {_hcl(str(schema))}
}}
replication {{
  mode        = "active-active"
  node_id     = {_hcl(self.id)}
  cluster_id  = "demo"
  listen_addr = {_hcl(f"{self.host}:{self.port}")}
  peers = [
{peers}
  ]
  auth = {{ secret_key_file = {_hcl(str(key_file))} }}
  sync = {{ interval = "200ms", batch_size = 500, max_lag = "10s",
           heartbeat_interval = "200ms", liveness_timeout = "2s" }}
  data = {{ dhcp_leases = true, dns_records = true }}
  conflict_resolution = {{ strategy = "timestamp" }}
  recovery = {{ checksum_interval = "1s" }}
  control_socket = "control.sock"
}}
"""
        )

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only look at the node's file, as any reporting tool would take."""
        conn = sqlite3.connect(f"{self.db.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def counts(self) -> dict[str, int] | None:
        try:
            return {t: int(self.read(f"SELECT count(*) FROM {t}")[0][0]) for t in TABLES}
        except sqlite3.Error:
            return None

    def conflicts(self) -> int | None:
        try:
            rows = self.read(
                "SELECT COALESCE(SUM(count), 0) FROM _repl_conflict_counts"
                " WHERE kind = 'concurrent'"
            )
        except sqlite3.Error:
            return None
        return int(rows[0][0])

    def writes(self) -> int:
        try:
            return int(json.loads(self.writer_state.read_text())["writes"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def table_digest(self, table: str) -> tuple[int, str]:
        """Row count and a hash of every row in key order: equal files give equal digests."""
        digest = hashlib.sha256()
        rows = self.read(f"SELECT * FROM {table} ORDER BY {TABLES[table]}")
        for row in rows:
            digest.update(repr(row).encode())
        return len(rows), digest.hexdigest()[:16]

    def app_write(self, sql: str, args: Sequence[Any]) -> int:
        """One application transaction; returns the hybrid-clock stamp the write got."""
        conn = sqlite3.connect(self.db, isolation_level=None, timeout=10)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, args)
            stamp = int(conn.execute("SELECT hlc FROM _repl_clock WHERE id = 1").fetchone()[0])
            conn.execute("COMMIT")
        finally:
            conn.close()
        return stamp

    def lease(self, mac: str) -> str | None:
        try:
            rows = self.read("SELECT hostname FROM dhcp_leases WHERE mac = ?", (mac,))
        except sqlite3.Error:
            return None
        return str(rows[0][0]) if rows else None


# ---------------------------------------------------------------------------------------------
# The application: one process per node, writing its node's file with plain sqlite3.


def _writer_main(argv: Sequence[str]) -> int:
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


# ---------------------------------------------------------------------------------------------
# The screen: a block redrawn in place on a terminal, periodic plain lines otherwise.


class Screen:
    def __init__(self, out: TextIO, plain_every: float) -> None:
        self.out = out
        self.live = out.isatty() and os.environ.get("TERM", "") != "dumb"
        self.plain_every = plain_every
        self.width = shutil.get_terminal_size((100, 24)).columns - 1
        self.drawn = 0
        self.block: list[str] = []
        self.printed_at = -1e9

    def say(self, text: str = "") -> None:
        """A line as given: printed above the live view, which is redrawn below it."""
        self._erase()
        self._write(text + "\n")
        self._draw()

    def tell(self, text: str, indent: int = 0) -> None:
        """Narration: one paragraph, wrapped to the terminal."""
        pad = " " * indent
        width = max(40, min(self.width, 96))
        wrapped = textwrap.fill(
            text, width, initial_indent=pad, subsequent_indent=pad, break_on_hyphens=False
        )
        self.say(wrapped)

    def show(self, lines: list[str], *, final: bool = False) -> None:
        self.block = lines
        if self.live:
            self._erase()
            self._draw()
        elif time.monotonic() - self.printed_at >= (REFRESH * 2 if final else self.plain_every):
            self.printed_at = time.monotonic()
            self._write("".join(f"  | {line}\n" for line in lines))

    def close(self) -> None:
        """Leave the last view on screen, the cursor below it, and stop redrawing it."""
        self.drawn = 0
        self.block = []

    def _erase(self) -> None:
        if self.drawn:
            self._write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _draw(self) -> None:
        if self.live and self.block:
            self._write("".join(line[: self.width] + "\n" for line in self.block))
            self.drawn = len(self.block)

    def _write(self, text: str) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.out.write(text)
            self.out.flush()


# ---------------------------------------------------------------------------------------------
# The demo


def _vector(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        return {}
    return {str(origin): int(seq) for origin, seq in raw.items() if seq}


def _origin_node(origin: str) -> str:
    return origin.partition("#")[0]


def _clock(stamp: int) -> str:
    ms = physical_ms(stamp)
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


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


class Demo:
    def __init__(self, root: Path, pace: Pace, out: TextIO, interrupts: _Interrupts) -> None:
        self.root = root
        self.pace = pace
        self.screen = Screen(out, pace.plain_every)
        self.children = Children(interrupts)
        self.nodes = [
            DemoNode(n, host, root / f"node{n}") for n, host in enumerate(_hosts(), start=1)
        ]
        self.started = time.monotonic()
        self.rates = _Rates()
        self.conflict_note = "not provoked"
        self.conflict_winner = ""
        self.outage_note = "not run"

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        key_file = self.root / "cluster.key"
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as key:
            key.write(secrets.token_urlsafe(32) + "\n")
        schema = self.root / "schema.sql"
        if EXAMPLE_SCHEMA.is_file():
            shutil.copyfile(EXAMPLE_SCHEMA, schema)
        else:
            schema.write_text(FALLBACK_SCHEMA)
        for node in self.nodes:
            node.directory.mkdir()
            node.port = free_port(node.host)
            if len(str(node.socket)) > SOCKET_PATH_MAX:
                raise DemoError(f"{node.socket} is too long for a Unix socket: use --dir SHORTER")
        for node in self.nodes:
            node.write_config(self.nodes, key_file, schema)

    def start_node(self, node: DemoNode) -> None:
        node.process = self.children.start(
            [sys.executable, "-m", "replicator", "run", "-c", str(node.config), "--log-format",
             "json"],
            node.directory / "node.log",
            own_group=False,
        )  # fmt: skip

    def start_writer(self, node: DemoNode) -> None:
        node.writer = self.children.start(
            [sys.executable, "-c",
             WRITER_CODE,
             str(node.db), str(node.number), str(self.pace.rate), str(node.writer_state)],
            node.directory / "app.log",
            own_group=True,
        )  # fmt: skip

    def stop_writers(self, nodes: Sequence[DemoNode]) -> None:
        self.children.stop([n.writer for n in nodes if n.writer is not None])

    def check_alive(self, node: DemoNode) -> None:
        if node.process is not None and node.process.poll() is not None:
            log = (node.directory / "node.log").read_text(errors="replace").splitlines()
            tail = "\n".join("    " + line for line in log[-8:])
            raise DemoError(f"{node.id} exited with status {node.process.returncode}:\n{tail}")

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
        self.screen.show(self.view())

    def view(self) -> list[str]:
        now = time.monotonic()
        total = sum(n.writes() for n in self.nodes)
        lines = [
            f"live view at {now - self.started:5.1f} s     application writes so far: {total:,}"
        ]
        for node in self.nodes:
            status = node.status()
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
                app = f"app {self.rates.rate((node.id, ''), node.writes(), now):4.0f} w/s"
            conflicts = node.conflicts()
            lines.append(
                f"{node.id}  {state:8}  leases/dns {rows}  {app:13}  conflicts "
                + ("-" if conflicts is None else str(conflicts))
            )
            for peer in (status or {}).get("peers", []):
                key = (node.id, str(peer["id"]))
                sent = self.rates.rate((*key, "sent"), int(peer["changes_sent"]), now)
                got = self.rates.rate((*key, "got"), int(peer["changes_received"]), now)
                lines.append(
                    f"   -> {peer['id']}  {peer['state']:12}  lag {peer['lag_changes']:6,} changes"
                    f" {float(peer['lag_seconds']):5.1f} s   out {sent:4.0f}/s  in {got:4.0f}/s"
                )
            for alarm in (status or {}).get("alarms", []):
                lines.append(f"   alarm: {alarm}")
        return lines

    def statuses(self) -> list[dict[str, Any] | None]:
        return [node.status() for node in self.nodes]

    def mesh_connected(self) -> bool:
        for node in self.nodes:
            self.check_alive(node)
        statuses = self.statuses()
        return all(
            s is not None and all(p["state"] == "connected" for p in s["peers"]) for s in statuses
        )

    # -- the acts -----------------------------------------------------------------------------

    def run(self) -> bool:
        tell, pace = self.screen.tell, self.pace
        tell(f"replicator demo: three nodes on this machine, their files in {self.root}")
        self.setup()
        tell(
            "Each node is a `replicator run` process with its own SQLite file. They reach each "
            "other over TCP (a full mesh), encrypted and authenticated with a freshly generated "
            "cluster key."
        )
        for node in self.nodes:
            self.start_node(node)
            tell(f"started {node.id} on {node.host}:{node.port}", 2)
        self.watch(30, self.mesh_connected, "the three nodes to connect")
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
        for node in self.nodes:
            self.start_writer(node)
        self.watch(pace.warmup)
        self.conflict()
        self.watch(pace.warmup / 2)
        self.crash()
        self.watch(pace.after)
        return self.verify()

    def conflict(self) -> None:
        tell = self.screen.tell
        node1, node2 = self.nodes[:2]
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
            lambda: all(n.lease(CONFLICT_MAC) == "printer" for n in self.nodes),
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
            lambda: all(n.lease(CONFLICT_MAC) == kept for n in self.nodes),
            "the two writes to settle",
        )
        self.screen.say(f"  {agreed:.1f} s later {self.lease_line()}")
        # The value can settle on a node before it has applied (and counted) the losing write.
        self.watch(5, lambda: all((n.conflicts() or 0) > 0 for n in self.nodes))
        counted = ", ".join(f"{n.id} {n.conflicts() or 0}" for n in self.nodes)
        tell(
            f"Why: the strategy is 'timestamp': the newest write wins, by hybrid logical clock "
            f"(the node id breaks an exact tie). {winner.id}'s write is {apart} ms newer than "
            f"{loser.id}'s, so every node keeps '{kept}', whichever order the two versions "
            f"reached it in. Conflicts counted: {counted}.",
            2,
        )
        self.conflict_note = f"one lease written on node1 and node2 {apart} ms apart"
        self.conflict_winner = f"{winner.id}'s newer '{kept}' kept on all three"

    def lease_line(self) -> str:
        return "   ".join(f"{n.id}: {n.lease(CONFLICT_MAC) or '?'}" for n in self.nodes)

    def crash(self) -> None:
        tell = self.screen.tell
        node1, node2, node3 = self.nodes
        self.screen.say()
        tell(
            "Crash: node3's replicator is killed with SIGKILL (no goodbye, nothing flushed) and "
            "its application stops with it. node1 and node2 carry on writing; what node3 misses "
            "waits in their change logs."
        )
        before = self.vector_of(node3)
        self.stop_writers([node3])
        self.children.stop([node3.process] if node3.process else [], signal.SIGKILL)
        self.watch(self.pace.outage)
        target: dict[str, int] = {}
        for node in (node1, node2):
            for origin, seq in self.vector_of(node).items():
                if _origin_node(origin) != node3.id:
                    target[origin] = max(target.get(origin, 0), seq)
        missed = sum(seq - before.get(origin, 0) for origin, seq in target.items())
        tell(f"Restarting node3: it missed {missed:,} changes while it was down.")
        restarted = time.monotonic()
        self.start_node(node3)
        answered: list[float] = []

        def caught_up() -> bool:
            self.check_alive(node3)
            status = node3.status()
            if status is None:
                return False
            if not answered:
                answered.append(time.monotonic() - restarted)
            have = _vector(status["version_vector"])
            return all(have.get(origin, 0) >= seq for origin, seq in target.items())

        self.watch(60, caught_up, "node3 to catch up")
        took = time.monotonic() - restarted
        self.start_writer(node3)
        tell(
            f"node3 answered on its control socket {answered[0]:.1f} s after the restart, and "
            f"held all {missed:,} missed changes {took:.1f} s after the restart (start-up "
            "included). Its application is running again.",
            2,
        )
        self.outage_note = f"{missed:,} changes missed, caught up {took:.1f} s after the restart"

    def vector_of(self, node: DemoNode) -> dict[str, int]:
        status = node.status()
        return {} if status is None else _vector(status["version_vector"])

    # -- the proof ------------------------------------------------------------------------------

    def checksums_agree(self) -> bool:
        """Same version vector everywhere, and each node's latest checksums taken at exactly
        that vector and identical."""
        statuses = self.statuses()
        views = []
        for status in statuses:
            if status is None:
                return False
            vector = _vector(status["version_vector"])
            divergence = status["divergence"]
            if _vector(divergence.get("vector")) != vector or not divergence.get("tables"):
                return False
            tables = {t: v["checksum"] for t, v in divergence["tables"].items()}
            views.append((vector, tables))
        return all(view == views[0] for view in views)

    def files_agree(self) -> bool:
        digests = [{t: n.table_digest(t) for t in TABLES} for n in self.nodes]
        return all(d == digests[0] for d in digests)

    def verify(self) -> bool:
        self.screen.say()
        self.screen.tell(
            "Stopping the applications, then checking that all three nodes hold the same data: "
            "identical table checksums at the same version vector, as the nodes report them, "
            "and identical table contents, read from the three SQLite files."
        )
        self.stop_writers(self.nodes)
        started = time.monotonic()
        try:
            self.watch(
                self.pace.converge_timeout,
                lambda: self.checksums_agree() and self.files_agree(),
                "convergence",
            )
            converged = True
        except DemoError:
            converged = False
        took = time.monotonic() - started
        self.screen.show(self.view(), final=True)
        self.screen.close()
        self.summary(converged, took)
        return converged

    def summary(self, converged: bool, took: float) -> None:
        say = self.screen.say
        say()
        say("Summary")
        say("  rows           " + "".join(f"{n.id:>9}" for n in self.nodes))
        for table in TABLES:
            cells = []
            for node in self.nodes:
                try:
                    cells.append(f"{node.table_digest(table)[0]:>9,}")
                except sqlite3.Error:
                    cells.append(f"{'?':>9}")
            say(f"  {table:13}" + "".join(cells))
        writes = [n.writes() for n in self.nodes]
        per_node = ", ".join(f"{n.id} {w:,}" for n, w in zip(self.nodes, writes, strict=True))
        say(f"  writes made    {sum(writes):,} ({per_node})")
        counted = ", ".join(f"{n.id} {n.conflicts() or 0}" for n in self.nodes)
        say(f"  conflicts      {self.conflict_note}")
        if self.conflict_winner:
            say(f"                 {self.conflict_winner}")
        say(f"                 counted by each node: {counted}")
        say(f"  crash          {self.outage_note}")
        if converged:
            say(f"  converged      yes, {took:.1f} s after the applications stopped")
        else:
            checksums = "agree" if self.checksums_agree() else "differ"
            files = "agree" if self.files_agree() else "differ"
            say(
                f"  converged      NO: {took:.0f} s after the applications stopped, checksums "
                f"{checksums}, file contents {files}"
            )


# ---------------------------------------------------------------------------------------------
# Entry points


def run_demo(*, short: bool = False, directory: str | None = None, keep: bool = False) -> int:
    """Run the demo; 0 when the three nodes converged, 1 when not (or a step failed), 2 for an
    unusable ``directory``, 130 when interrupted. Every process it started is stopped, and its
    temporary directory removed (unless ``keep``), before it returns."""
    out = sys.stdout
    interrupts = _Interrupts()
    interrupts.install()
    root: Path | None = None
    remove = False
    demo: Demo | None = None
    status = 1
    try:
        if directory is None:
            root = Path(tempfile.mkdtemp(prefix="repl-demo-"))
            remove = not keep
        else:
            given = Path(directory).resolve()
            given.mkdir(parents=True, exist_ok=True)
            if any(given.iterdir()):
                print(f"replicator demo: {given} is not empty: give a new or empty directory")
                return 2
            root = given
        demo = Demo(root, SHORT if short else FULL, out, interrupts)
        status = 0 if demo.run() else 1
    except KeyboardInterrupt:
        print("\nInterrupted: stopping every node and application ...", file=out, flush=True)
        status = 130
    except ReplicationError as error:  # DemoError among them
        print(f"\nreplicator demo failed: {error}", file=out, flush=True)
        status = 1
    finally:
        interrupts.depth += 1  # from here on a signal is noted, not raised: cleanup must finish
        try:
            if demo is not None:
                demo.children.stop_all()
            if root is not None and remove:
                shutil.rmtree(root, ignore_errors=True)
            elif root is not None:
                print(f"Files kept in {root}", file=out, flush=True)
        finally:
            interrupts.restore()
    if status == 130:
        print("Stopped; nothing left running.", file=out, flush=True)
    return status
