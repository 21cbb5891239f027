"""Redis primary -> replica beside `scripts/bench`'s nodes: the part of `scripts/bench --peers`
that knows Redis, /proc and the comparison table (the measurements are driven from
`scripts/bench`, with its application writer process, pacing loop and polling loops).

Redis is Debian's `redis-server` (`apt-get install redis-server`), two processes on free
loopback ports with a temporary directory each, started with `--save ''` and `--appendonly
no`: Redis keeps the data in memory only and never fsyncs here (our nodes run WAL with
synchronous=NORMAL: no fsync per commit either, but every commit is in the file). The replica
runs `--replicaof 127.0.0.1 <primary port>`; both speak plain TCP (no encryption, no
compression; our nodes encrypt and lz4-compress). The client is redis-py (the `redis` package
of the dev extra). A lease is one hash, `HSET lease:<mac> ip .. hostname .. scope .. expires
.. client_id ..`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replicator.harness import die_with_parent, free_port, stop_processes

HOST = "127.0.0.1"
KEY_PREFIX = "lease:"
START_TIMEOUT = 30.0  # a Redis process answering PING, the replica's link up
STOP_GRACE = 10.0  # SIGTERM, then SIGKILL
INSTALL_HINT = "apt-get install redis-server"
CLIENT_HINT = "/work/main/.venv/bin/pip install -e '.[dev]' (the redis package)"

# Targets of issue 16 for the comparison.
E2E_VS_REDIS_TARGET = 1.2  # end to end, ours / Redis
APP_KEEPS_TARGET = 0.50  # application commit rate, captured / plain
PEERS_LAG_P99_MS = 2.0
PEERS_LAG_RATE = 5000.0  # the lag target is stated at this rate
MESH_VS_TWO_TARGET = 0.8
RESYNC_TARGET_ROWS = 1_000_000
RESYNC_TARGET_RATE = 200_000.0


# -- redis-server --------------------------------------------------------------------------------


def redis_server() -> str:
    """The redis-server binary, or exit saying how to install it."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        raise SystemExit(f"scripts/bench --peers: redis-server not found: {INSTALL_HINT}")
    return found


def redis_client_module() -> Any:
    """The redis-py module, or exit saying how to install it."""
    try:
        import redis
    except ImportError:
        raise SystemExit(f"scripts/bench --peers: no redis-py: {CLIENT_HINT}") from None
    return redis


def redis_version(server: str) -> str:
    """The version of `redis-server --version` ("7.0.15"), or its whole line."""
    out = subprocess.run(
        [server, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out or "?"


class RedisServer:
    """One redis-server process on a free loopback port, in its own directory."""

    def __init__(self, server: str, directory: Path, replicaof: int | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port(HOST)
        self.log_path = directory / "redis.log"
        args = [
            server,
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            # The first sync of a replica starts at once (the default waits 5 s for others).
            "--repl-diskless-sync-delay",
            "0",
        ]
        if replicaof is not None:
            args += ["--replicaof", HOST, str(replicaof)]
        self.process = _spawn(args, self.log_path, directory)

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self) -> Any:
        return redis_client_module().Redis(host=HOST, port=self.port, socket_timeout=30)

    def check_alive(self, name: str) -> None:
        if self.process.poll() is not None:
            raise SystemExit(
                f"redis {name} exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_GRACE s."""
        stop_processes([self.process], signal.SIGTERM, STOP_GRACE)


def _spawn(args: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            # PR_SET_PDEATHSIG: the server goes with the bench even if that is SIGKILLed.
            preexec_fn=die_with_parent,  # noqa: PLW1509 (no thread runs in the bench)
        )


@dataclass(slots=True)
class RedisPair:
    primary: RedisServer
    replica: RedisServer
    version: str

    def check_alive(self) -> None:
        self.primary.check_alive("primary")
        self.replica.check_alive("replica")

    @property
    def pids(self) -> tuple[int, int]:
        return self.primary.pid, self.replica.pid


@contextlib.contextmanager
def redis_pair(root: Path, name: str) -> Iterator[RedisPair]:
    """A primary and its replica, the replica's link up; both always stopped on the way out
    (SIGTERM, SIGKILL after 10 s) and their directories removed."""
    server = redis_server()
    redis_client_module()
    directory = root / name
    servers: list[RedisServer] = []
    try:
        primary = RedisServer(server, directory / "primary")
        servers.append(primary)
        replica = RedisServer(server, directory / "replica", replicaof=primary.port)
        servers.append(replica)
        pair = RedisPair(primary, replica, redis_version(server))
        _wait_ping(primary, pair)
        _wait_ping(replica, pair)
        _wait_link_up(replica, pair)
        yield pair
    finally:
        for running in reversed(servers):
            try:
                running.stop()
            except Exception as error:
                print(f"stopping redis on port {running.port}: {error}", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)


def _wait_ping(redis: RedisServer, pair: RedisPair) -> None:
    errors = redis_client_module().exceptions.ConnectionError

    def answers(client: Any) -> bool:
        try:
            return bool(client.ping())
        except errors:
            return False

    _wait_for(redis, pair, answers, lambda: (
        f"redis on port {redis.port} did not answer PING within {START_TIMEOUT:g} s:\n"
        f"{redis.log_tail()}"
    ))  # fmt: skip


def _wait_link_up(replica: RedisServer, pair: RedisPair) -> None:
    """Until the replica's INFO replication says master_link_status:up."""

    def link_up(client: Any) -> bool:
        return bool(client.info("replication").get("master_link_status") == "up")

    _wait_for(replica, pair, link_up, lambda: (
        f"the Redis replica's link did not come up within {START_TIMEOUT:g} s:\n"
        f"--- primary\n{pair.primary.log_tail()}\n--- replica\n{replica.log_tail()}"
    ))  # fmt: skip


def _wait_for(
    redis: RedisServer, pair: RedisPair, ready: Callable[[Any], bool], failure: Callable[[], str]
) -> None:
    """Poll ``ready(client)`` every 20 ms until true; exit with ``failure()`` after
    `START_TIMEOUT` (or as soon as either server died)."""
    deadline = time.monotonic() + START_TIMEOUT
    client = redis.client()
    try:
        while not ready(client):
            pair.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(failure())
            time.sleep(0.02)
    finally:
        client.close()


# -- the rows as hashes, the application's writes ------------------------------------------------


def lease_key(mac: str) -> str:
    return KEY_PREFIX + mac


def lease_hash(row: Sequence[Any], columns: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """`lease:<mac>` and the other columns as the hash's fields."""
    return lease_key(row[0]), dict(zip(columns[1:], row[1:], strict=True))


def redis_committer(
    port: int, rows: Sequence[Sequence[Any]], columns: Sequence[str]
) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """For the application process: commit(start, end) writes rows[start:end] to the primary,
    one HSET for a single row, else one MULTI/EXEC (a transactional pipeline, one round
    trip); and close()."""
    client = redis_client_module().Redis(host=HOST, port=port, socket_timeout=60)
    client.ping()
    items = [lease_hash(row, columns) for row in rows]

    def commit(start: int, end: int) -> None:
        if end - start == 1:
            key, fields = items[start]
            client.hset(key, mapping=fields)
            return
        pipe = client.pipeline(transaction=True)
        for key, fields in items[start:end]:
            pipe.hset(key, mapping=fields)
        pipe.execute()

    return commit, client.close


# -- watching the replica ------------------------------------------------------------------------


def wait_for_last_key(
    client: Any,
    last_key: str,
    count: int,
    poll: float,
    timeout: float,
    check: Callable[[], None],
) -> float:
    """When the replica first held the last key with all `count` keys, as phase 1 watches a
    node's file: every `poll` s one MULTI/EXEC of EXISTS (the last key) and DBSIZE (one
    snapshot, one round trip); the time is taken when it returns."""
    deadline = time.monotonic() + timeout
    while True:
        pipe = client.pipeline(transaction=True)
        pipe.exists(last_key)
        pipe.dbsize()
        there, size = pipe.execute()
        now = time.monotonic()
        if there and size >= count:
            return now
        check()
        if now > deadline:
            raise SystemExit(f"timed out after {timeout:g}s waiting for the Redis replica")
        time.sleep(poll)


class RedisLagWatcher:
    """Records when each key of a paced run first shows on the replica: `LagWatcher` of
    scripts/bench for Redis, turn for turn. A turn reads DBSIZE (one round trip; it changes
    only when the replica applied a write, as `PRAGMA data_version` for the file) and only then
    reads `expires` of the keys that may have arrived (HGET in one pipeline: the keys are
    written, hence replicated, in index order, so with DBSIZE n keys 0..n-1 are there) and
    stamps each found with time.monotonic() taken after that read returned. The row's index
    comes back from its `expires` field. The lag is overstated by at most one loop period
    (measured, printed), which is longer than for the file: DBSIZE is a round trip on
    loopback where data_version is a few microseconds in this process."""

    def __init__(self, client: Any, keys: Sequence[str], first: int, epoch: int) -> None:
        self.client = client
        self.keys = keys
        self.first = first
        self.epoch = epoch
        self.seen = [math.nan] * len(keys)
        self.remaining = len(keys)
        self._next = 0  # keys before it are all seen
        self._size: int | None = None
        self._last_turn: float | None = None
        self.periods: list[float] = []

    def turn(self) -> None:
        now = time.monotonic()
        if self._last_turn is not None:
            self.periods.append(now - self._last_turn)
        self._last_turn = now
        size = self.client.dbsize()
        if size == self._size:
            return
        self._size = size
        candidates = self.keys[self._next : min(size, len(self.keys))]
        if not candidates:
            return
        pipe = self.client.pipeline(transaction=False)
        for key in candidates:
            pipe.hget(key, "expires")
        values = pipe.execute()
        stamp = time.monotonic()
        seen, count = self.seen, len(self.seen)
        for value in values:
            if value is None:
                self._size = None  # read them again next turn
                continue
            index = int(value) - self.epoch - self.first
            if 0 <= index < count and math.isnan(seen[index]):
                seen[index] = stamp
                self.remaining -= 1
        while self._next < count and not math.isnan(seen[self._next]):
            self._next += 1

    def close(self) -> None:
        self.client.close()


# -- /proc ---------------------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is the state, field 3
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """VmRSS from /proc/PID/status (0 once the process is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


# -- the table ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Side:
    """One system's figures: medians where there were repeats."""

    end_to_end: float  # rows/s, first transaction's start -> last row on the replica(s)
    application: float = math.nan  # rows/s the application's writes alone took
    tail: float = math.nan  # s, last commit returned -> last row on the replica(s)
    lag_p50: float | None = None  # ms
    lag_p99: float | None = None
    lag_missing: int = 0
    achieved: float | None = None  # single-row commits/s the paced writer reached
    period_p99: float | None = None  # ms, the lag watcher's loop period (its resolution)
    cpu: tuple[float, ...] = ()  # server CPU s per 10,000 changes, one per process
    rss_kib: tuple[int, ...] = ()  # VmRSS at the end of the bulk run, one per process


@dataclass(slots=True)
class PeersFigures:
    redis_version: str
    redis_client: str
    rows: int
    mesh_rows: int
    repeats: int
    lag_rate: float
    lag_seconds: float
    redis: Side
    two: Side
    mesh: Side
    plain_bulk: float  # application rows/s into a file with no triggers
    captured_bulk: float  # the same into a Store.open file
    plain_single: float
    captured_single: float
    single_rows: int
    steady_seconds: float
    rss_flat: list[tuple[str, float, bool]]  # node, end / baseline, flat
    rss_baseline_at: float
    resync_rows: int | None = None  # None: phase 6 did not run
    resync_rate: float | None = None
    resync_verified: bool = False


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def report_peers(f: PeersFigures) -> list[bool]:
    """The comparison table, the ratios and the targets; the verdicts of the targets that
    could be judged in this run."""
    _print_table(f)
    ratios = Ratios(
        e2e=_ratio(f.two.end_to_end, f.redis.end_to_end),
        lag_p99=_ratio(f.two.lag_p99, f.redis.lag_p99),
        bulk_keeps=_ratio(f.captured_bulk, f.plain_bulk),
        single_keeps=_ratio(f.captured_single, f.plain_single),
        mesh=_ratio(f.mesh.end_to_end, f.two.end_to_end),
    )
    _print_ratios(f, ratios)
    return _print_targets(f, ratios)


@dataclass(frozen=True, slots=True)
class Ratios:
    e2e: float | None  # end to end, two nodes / Redis
    lag_p99: float | None  # two nodes / Redis
    bulk_keeps: float | None  # application commit rate, captured / plain
    single_keeps: float | None
    mesh: float | None  # end to end, three-node mesh / two nodes


def _row(label: str, value: str, detail: str = "") -> None:
    print(f"  {label:<58}{value:>10}   {detail}".rstrip())


def _print_table(f: PeersFigures) -> None:
    lag = f"{f.lag_rate:,.0f}/s for {f.lag_seconds:g} s"
    print(
        f"\npeers: Redis {f.redis_version} primary -> replica ({f.redis_client}) beside our"
        " nodes, on the same\n   leases (one hash per lease), with the same application"
        " process, pacing loop and polling.\n   Redis runs --save '' --appendonly no (memory"
        " only, no fsync) over plain TCP; our nodes run\n   WAL + synchronous=NORMAL, encrypted"
        f" and lz4-compressed. end to end: {f.rows:,} rows ({f.mesh_rows:,}\n   for the mesh)"
        f" in 1,000-row transactions (MULTI/EXEC for Redis), median of {f.repeats};\n   lag:"
        f" single-row commits paced at {lag}"
    )
    rows = [
        ("", "end to end, rows/s", "lag p50 / p99", "commits/s achieved"),
        (
            f"Redis {f.redis_version} primary -> replica",
            _rate(f.redis.end_to_end),
            f"{_ms(f.redis.lag_p50)} / {_ms(f.redis.lag_p99)} ms",
            _rate(f.redis.achieved),
        ),
        (
            "replicator, two nodes",
            _rate(f.two.end_to_end),
            f"{_ms(f.two.lag_p50)} / {_ms(f.two.lag_p99)} ms",
            _rate(f.two.achieved),
        ),
        ("replicator, three-node mesh", _rate(f.mesh.end_to_end), "", ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for number, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        print("  | " + " | ".join(cells) + " |")
        if number == 0:
            print("  |" + "|".join("-" * (width + 2) for width in widths) + "|")
    missing = [
        f"{name}: {side.lag_missing:,} rows never seen"
        for name, side in (("Redis", f.redis), ("two nodes", f.two))
        if side.lag_missing
    ]
    print(
        f"  lag watcher period p99 (its resolution): Redis {_ms(f.redis.period_p99)} ms,"
        f" nodes {_ms(f.two.period_p99)} ms" + (f"; {', '.join(missing)}" if missing else "")
    )


def _print_ratios(f: PeersFigures, r: Ratios) -> None:
    ours_cpu, redis_cpu = sum(f.two.cpu), sum(f.redis.cpu)
    ours_rss, redis_rss = sum(f.two.rss_kib), sum(f.redis.rss_kib)
    print("\n  ratios")
    _row(
        "end to end, two nodes / Redis",
        _x(r.e2e),
        "the writes alone: "
        f"{f.two.application:,.0f} / {f.redis.application:,.0f} rows/s; last write -> last row"
        f" on the replica: {f.two.tail * 1000:,.0f} / {f.redis.tail * 1000:,.0f} ms",
    )
    _row("lag p99, two nodes / Redis", _x(r.lag_p99))
    _row(
        "app commit rate, captured / plain, bulk",
        _x(r.bulk_keeps),
        f"{f.captured_bulk:,.0f} / {f.plain_bulk:,.0f} rows/s",
    )
    _row(
        "app commit rate, captured / plain, single-row",
        _x(r.single_keeps),
        f"{f.captured_single:,.0f} / {f.plain_single:,.0f} commits/s",
    )
    _row("end to end, three-node mesh / two nodes", _x(r.mesh))
    if f.resync_rate is None:
        _row("full resync, rows/s (phase 6)", "not run")
    else:
        _row(
            "full resync, rows/s (phase 6)",
            _rate(f.resync_rate),
            f"{f.resync_rows:,} rows, " + ("verified" if f.resync_verified else "NOT verified"),
        )
    _row(
        "server CPU s per 10,000 changes, two nodes / Redis",
        _x(_ratio(ours_cpu, redis_cpu)),
        f"node1 {f.two.cpu[0]:.3f} + node2 {f.two.cpu[1]:.3f} = {ours_cpu:.3f} s;"
        f" Redis {f.redis.cpu[0]:.3f} + {f.redis.cpu[1]:.3f} = {redis_cpu:.3f} s",
    )
    _row(
        "VmRSS at the end of the bulk run, two nodes / Redis",
        _x(_ratio(ours_rss, redis_rss)),
        f"node1 {f.two.rss_kib[0] / 1024:.1f} + node2 {f.two.rss_kib[1] / 1024:.1f} MiB;"
        f" Redis {f.redis.rss_kib[0] / 1024:.1f} + {f.redis.rss_kib[1] / 1024:.1f} MiB",
    )
    flat = bool(f.rss_flat) and all(met for _, _, met in f.rss_flat)
    _row(
        f"VmRSS flat over a {f.steady_seconds:g} s steady run (phase 5)",
        "yes" if flat else "no",
        ", ".join(
            f"{name} end / @{f.rss_baseline_at:.0f}s {ratio:.3f}" for name, ratio, _ in f.rss_flat
        ),
    )
    print(
        f"  bulk: {f.rows:,} rows, 1,000 per txn; single-row: {f.single_rows:,} commits"
        " (phase 2's count); as fast as the\n  application can, into a file with no trigger"
        " (plain) or prepared by Store.open (captured),\n  no node running. CPU: utime+stime"
        f" (/proc/PID/stat, ticks of 1/{_CLOCK_TICKS} s) of the two servers\n  from the"
        " application's go to the last row on the replica, per 10,000 rows: the cores\n  busy"
        " at 10,000 changes/s; the application's own CPU is not counted. Redis holds every\n"
        "  row in memory, our nodes in the file."
    )


def _print_targets(f: PeersFigures, r: Ratios) -> list[bool]:
    """The targets of issue 16 with MET / MISSED (or why not judged); the judged verdicts."""
    print("\n  targets (issue 16)")
    achieved = f.two.achieved is not None and f.two.achieved >= 0.95 * PEERS_LAG_RATE
    lag_met: bool | None = None
    lag_text = f"not run at this rate ({f.lag_rate:,.0f}/s)"
    if f.lag_rate == PEERS_LAG_RATE:
        lag_met = (
            achieved
            and f.two.lag_missing == 0
            and f.two.lag_p99 is not None
            and f.two.lag_p99 <= PEERS_LAG_P99_MS
        )
        lag_text = _verdict(lag_met) + (
            "" if achieved else f" ({_rate(f.two.achieved)}/s achieved)"
        )
    resync_met: bool | None = None
    resync_text = "not run" if f.resync_rate is None else "not run at this size"
    if f.resync_rate is not None and (f.resync_rows or 0) >= RESYNC_TARGET_ROWS:
        resync_met = f.resync_verified and f.resync_rate >= RESYNC_TARGET_RATE
        resync_text = _verdict(resync_met)
    bulk_met = _at_least(r.bulk_keeps, APP_KEEPS_TARGET)
    single_met = _at_least(r.single_keeps, APP_KEEPS_TARGET)
    e2e_met = _at_least(r.e2e, E2E_VS_REDIS_TARGET)
    mesh_met = _at_least(r.mesh, MESH_VS_TWO_TARGET)
    keeps = f"app keeps >= {APP_KEEPS_TARGET:.0%} of the plain commit rate"
    targets: list[tuple[str, str, bool | None, str]] = [
        (f"end to end >= {E2E_VS_REDIS_TARGET:g}x Redis", _x(r.e2e), e2e_met, _verdict(e2e_met)),
        (f"{keeps}, bulk", _x(r.bulk_keeps), bulk_met, _verdict(bulk_met)),
        (f"{keeps}, single-row", _x(r.single_keeps), single_met, _verdict(single_met)),
        (
            f"lag p99 <= {PEERS_LAG_P99_MS:g} ms at {PEERS_LAG_RATE:,.0f}/s, >= 95% achieved",
            f"{_ms(f.two.lag_p99)} ms",
            lag_met,
            lag_text,
        ),
        (f"mesh >= {MESH_VS_TWO_TARGET:g}x two-node", _x(r.mesh), mesh_met, _verdict(mesh_met)),
        (
            f"full resync of {RESYNC_TARGET_ROWS:,} rows >= {RESYNC_TARGET_RATE:,.0f}/s, verified",
            _rate(f.resync_rate),
            resync_met,
            resync_text,
        ),
    ]
    for label, value, _, text in targets:
        _row(label, value, text)
    judged = [met for _, _, met, _ in targets if met is not None]
    print(f"  --peers targets met: {sum(judged)} of {len(judged)}")
    return judged


def _at_least(value: float | None, target: float) -> bool:
    return value is not None and value >= target
