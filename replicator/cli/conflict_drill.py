"""`test-conflict`: provoke a real conflict between two nodes and show how it was decided."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import click

from replicator.cli import render as fmt
from replicator.cli.app import (
    EXIT_PROBLEM,
    TEST_KEY_PREFIX,
    Json,
    Problem,
    main,
)
from replicator.cli.conflicts import _conflict_path
from replicator.cli.target import (
    Target,
    _object,
    _target,
)
from replicator.config import Config, load_config
from replicator.errors import ReplicationError
from replicator.ops.client import ControlClient


@main.command("test-conflict")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True),
    help="This node's config file.",
)
@click.option(
    "--peer-config",
    type=click.Path(dir_okay=False, exists=True),
    help="Its peer's config file (the peer must run on this machine too).",
)
@click.option(
    "--table",
    metavar="NAME",
    help="The replicated table to write the scratch row in (default: the first one a "
    "scratch row fits).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    default=30.0,
    show_default=True,
    help="How long to wait for each step to replicate.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON at the end.")
def test_conflict(
    config_path: str | None,
    peer_config: str | None,
    table: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Provoke a harmless conflict and show how it resolved.

    Needs both nodes' configs on this machine (a local pair, a lab, the demo): -c FILE for
    this node, --peer-config FILE for its peer, both running, connected and writable
    (active-active or multi-master). Steps: write a scratch row (key starting
    "replicator-test-conflict-") and wait for it to replicate; pause replication on both;
    update the row on both with different values; resume; wait until both hold the same
    value; print which write won and how the conflict counts moved (a manual-strategy
    conflict is shown, then resolved); delete the scratch row (a replicated delete).
    Replication is resumed whatever happens. Exits 1 if the nodes do not converge in time.
    """
    if config_path is None or peer_config is None:
        raise click.UsageError(
            "test-conflict writes into both nodes' state files: give this node's config "
            "with -c FILE and its peer's with --peer-config FILE (both on this machine)"
        )
    target = _target(None, config_path, as_json)
    assert target.config is not None
    result = _ConflictTest(target, target.config, load_config(peer_config), table, timeout).run()
    if target.as_json:
        target.dump(result)
    if not result["converged"]:
        raise click.exceptions.Exit(EXIT_PROBLEM)


@dataclass(frozen=True, slots=True)
class _Side:
    node_id: str
    config: Config
    client: ControlClient


@dataclass(frozen=True, slots=True)
class _Scratch:
    """Where the scratch row goes: its table, key columns and values, the column that differs."""

    table: str
    key: dict[str, object]
    filler: dict[str, object]
    column: str

    def where(self) -> tuple[str, list[object]]:
        clause = " AND ".join(f"{_ident(c)} = ?" for c in self.key)
        return clause, list(self.key.values())


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_WHY_IT_WON = {
    "timestamp": "the newer hybrid-logical-clock stamp",
    "priority": "the node with the higher priority",
    "manual": "the provisional winner, queued for review",
}


class _ConflictTest:
    def __init__(
        self, target: Target, local: Config, remote: Config, table: str | None, timeout: float
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.wanted_table = table
        self.a = _Side(local.replication.node_id, local, target.client())
        self.b = _Side(
            remote.replication.node_id, remote, ControlClient(remote.replication.control_socket)
        )
        self.result: Json = {}

    def say(self, line: str) -> None:
        """Narrate a step as it happens (the JSON answer comes at the end instead)."""
        if not self.target.as_json:
            click.echo(line)

    def run(self) -> Json:
        a, b = self.a, self.b
        reports = self._check_ready()
        scratch = self._scratch()
        resolution = a.config.replication.conflict_resolution
        strategy = resolution.tables.get(scratch.table, resolution.strategy)
        key_text = ", ".join(f"{c}={v!r}" for c, v in scratch.key.items())
        self.say(f"Scratch row: {scratch.table} ({key_text}); strategy {strategy}.")
        started = time.monotonic()
        self.result = {
            "table": scratch.table,
            "key": scratch.key,
            "column": scratch.column,
            "strategy": strategy,
            "converged": False,
        }
        before = {n: _conflicts_counted(r, scratch.table) for n, r in reports.items()}
        initial = f"{TEST_KEY_PREFIX}initial"
        self._write(a, scratch, initial, insert=True)
        if not self._wait(lambda: self._value(b, scratch) == (initial,)):
            self.say(
                f"The scratch row did not reach {b.node_id} in {fmt.duration(self.timeout)}"
                " (a replication filter? see `replicator status`)."
            )
            self._delete(a, scratch)
            return self.result
        self.say(f"  written on {a.node_id}, replicated to {b.node_id}")
        written = self._write_both_while_paused(scratch)
        self.say("  replication resumed; waiting for both nodes to agree...")

        def settled() -> bool:
            held = [self._value(side, scratch) for side in (a, b)]
            if held[0] != held[1] or held[0] is None:
                return False
            return all(
                sum(self._counted(s, scratch.table).values()) > sum(before[s.node_id].values())
                for s in (a, b)
            )

        converged = self._wait(settled)
        self._report(scratch, written, before, converged)
        if converged:
            self._close_queued(scratch)
        self._delete(a, scratch)
        gone = self._wait(lambda: self._value(b, scratch) is None)
        self.say(
            "  scratch row deleted on both nodes"
            if gone
            else f"  scratch row deleted on {a.node_id}; {b.node_id} has not applied it yet"
        )
        self.result["seconds"] = round(time.monotonic() - started, 3)
        self.say(f"Done in {fmt.duration(self.result['seconds'])}.")
        return self.result

    def _check_ready(self) -> dict[str, Json]:
        """Both nodes up, writable, running and connected to each other; their reports."""
        a, b = self.a, self.b
        if b.node_id not in {peer.id for peer in a.config.replication.peers}:
            raise click.UsageError(
                f"{b.node_id} (--peer-config) is not a configured peer of {a.node_id} (-c)"
            )
        reports = {}
        for side, other in ((a, b), (b, a)):
            report = _object(side.client.get("/api/replication/status"))
            if report["role"] != "peer":
                raise Problem(
                    f"{side.node_id} is {report['role']} ({report['mode']}): a conflict needs "
                    "two writable nodes (active-active or multi-master)"
                )
            if report["paused"]:
                raise Problem(f"replication is paused on {side.node_id}: resume it first")
            state = {p["id"]: p["state"] for p in report["peers"]}.get(other.node_id, "unknown")
            if state != "connected":
                raise Problem(f"{side.node_id} is not connected to {other.node_id} ({state})")
            reports[side.node_id] = report
        return reports

    def _write_both_while_paused(self, scratch: _Scratch) -> dict[str, str]:
        """Each node updates the row while neither can hear the other: concurrent writes."""
        sides = (self.a, self.b)
        written = {side.node_id: f"{TEST_KEY_PREFIX}from-{side.node_id}" for side in sides}
        try:
            for side in sides:
                side.client.post("/api/replication/pause")
            self.say(f"  replication paused on {self.a.node_id} and {self.b.node_id}")
            for side in sides:
                self._write(side, scratch, written[side.node_id], insert=False)
                self.say(f"  {side.node_id} wrote {scratch.column} = {written[side.node_id]!r}")
        finally:
            for side in sides:
                with contextlib.suppress(ReplicationError):
                    side.client.post("/api/replication/resume")
        return written

    def _report(
        self,
        scratch: _Scratch,
        written: dict[str, str],
        before: dict[str, dict[str, int]],
        converged: bool,
    ) -> None:
        sides = (self.a, self.b)
        held = {side.node_id: _first(self._value(side, scratch)) for side in sides}
        counted = {
            s.node_id: _increase(before[s.node_id], self._counted(s, scratch.table)) for s in sides
        }
        won = [node for node, value in written.items() if value == held[self.a.node_id]]
        winner = won[0] if won and converged else None
        self.result.update(
            written=written, held=held, winner=winner, conflicts_counted=counted,
            converged=converged,
        )  # fmt: skip
        if converged:
            why = _WHY_IT_WON.get(self.result["strategy"], "by the table's strategy")
            self.say(f"Both nodes hold {held[self.a.node_id]!r}: {winner}'s write won ({why}).")
        else:
            self.say(click.style(f"Not converged after {fmt.duration(self.timeout)}:", fg="red"))
            for line in fmt.block([(f"{n} holds", repr(v)) for n, v in held.items()]):
                self.say(line)
        for node, kinds in counted.items():
            increase = ", ".join(f"+{n} {kind}" for kind, n in kinds.items()) or "none"
            self.say(f"  conflicts counted on {node}: {increase}")

    def _close_queued(self, scratch: _Scratch) -> None:
        """A manual-strategy conflict waits for an operator: show it, then resolve it here."""
        query = urllib.parse.urlencode({"status": "open", "limit": 1000})
        found = _object(self.a.client.get(f"/api/replication/conflicts?{query}"))["conflicts"]
        key_values = [str(v) for v in scratch.key.values()]
        mine = [c for c in found if c["table"] == scratch.table
                and all(v in c["key"] for v in key_values)]  # fmt: skip
        self.result["queued_conflicts"] = [c["id"] for c in mine]
        for conflict in mine:
            self.say(
                f"  queued for review as conflict {conflict['id']} (provisional winner: "
                f"{conflict['winner']}); resolving it with --use local"
            )
            self.a.client.post(f"{_conflict_path(conflict['id'])}/resolve", {"use": "local"})

    def _scratch(self) -> _Scratch:
        a = self.a
        tables = a.config.replication.replicated_tables()
        if self.wanted_table is not None:
            if self.wanted_table not in tables:
                raise click.BadParameter(
                    f"{self.wanted_table!r} is not replicated (replicated: {', '.join(tables)})",
                    param_hint="--table",
                )
            tables = (self.wanted_table,)
        token = secrets.token_hex(4)
        with contextlib.closing(self._connect(a)) as conn:
            for table in tables:
                scratch = _scratch_for(conn, table, f"{TEST_KEY_PREFIX}{token}")
                if scratch is not None:
                    return scratch
        raise Problem(
            f"no replicated table takes a scratch row ({', '.join(tables)}): it needs a text "
            "primary-key column and a column besides the key"
        )

    def _connect(self, side: _Side) -> sqlite3.Connection:
        """The node's state file as an application would open it (never creating one)."""
        path = side.config.state.path
        try:
            conn = sqlite3.connect(
                f"file:{urllib.parse.quote(path)}?mode=rw", uri=True, timeout=10,
                isolation_level=None,
            )  # fmt: skip
            conn.execute("PRAGMA busy_timeout = 10000")
        except sqlite3.Error as error:
            raise Problem(f"cannot open {side.node_id}'s state file {path}: {error}") from None
        return conn

    def _write(self, side: _Side, scratch: _Scratch, value: str, *, insert: bool) -> None:
        try:
            with contextlib.closing(self._connect(side)) as conn:
                if insert:
                    row = {**scratch.key, **scratch.filler, scratch.column: value}
                    columns = ", ".join(_ident(c) for c in row)
                    marks = ", ".join("?" for _ in row)
                    conn.execute(
                        f"INSERT INTO {_ident(scratch.table)} ({columns}) VALUES ({marks})",
                        list(row.values()),
                    )
                else:
                    clause, params = scratch.where()
                    conn.execute(
                        f"UPDATE {_ident(scratch.table)} SET {_ident(scratch.column)} = ?"
                        f" WHERE {clause}",
                        [value, *params],
                    )
        except sqlite3.Error as error:
            raise Problem(
                f"cannot write the scratch row into {scratch.table} on {side.node_id}: {error}"
                " (try another table with --table)"
            ) from None

    def _delete(self, side: _Side, scratch: _Scratch) -> None:
        clause, params = scratch.where()
        with contextlib.closing(self._connect(side)) as conn:
            conn.execute(f"DELETE FROM {_ident(scratch.table)} WHERE {clause}", params)

    def _value(self, side: _Side, scratch: _Scratch) -> tuple[object] | None:
        clause, params = scratch.where()
        with contextlib.closing(self._connect(side)) as conn:
            row = conn.execute(
                f"SELECT {_ident(scratch.column)} FROM {_ident(scratch.table)} WHERE {clause}",
                params,
            ).fetchone()
        return None if row is None else (row[0],)

    def _counted(self, side: _Side, table: str) -> dict[str, int]:
        return _conflicts_counted(_object(side.client.get("/api/replication/status")), table)

    def _wait(self, condition: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.1)
        return condition()


def _first(value: tuple[object] | None) -> object:
    return None if value is None else value[0]


def _conflicts_counted(report: Json, table: str) -> dict[str, int]:
    """The table's conflicts counted so far, by kind (concurrent, near_tie...)."""
    counted: dict[str, int] = {}
    for kinds in report.get("conflicts", {}).get("by_table", {}).get(table, {}).values():
        for kind, n in kinds.items():
            counted[kind] = counted.get(kind, 0) + int(n)
    return counted


def _increase(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


def _scratch_for(conn: sqlite3.Connection, table: str, key: str) -> _Scratch | None:
    """A row that fits ``table``: text key columns get the scratch key, NOT NULL columns a
    placeholder of their type; the column that differs is a text one outside the key
    (nullable ones first: fewer constraints). None when the table has no such columns."""
    columns = conn.execute(f"PRAGMA table_info({_ident(table)})").fetchall()
    key_columns = sorted((pk, name, _affinity(decl)) for _, name, decl, _, _, pk in columns if pk)
    if not any(affinity == "text" for _, _, affinity in key_columns):
        return None
    differing = sorted(
        (notnull, cid, name)
        for cid, name, decl, notnull, _, pk in columns
        if not pk and _affinity(decl) == "text"
    )
    if not differing:
        return None
    column = differing[0][2]
    placeholders = {"text": key, "integer": 0, "real": 0.0, "blob": b""}
    filler = {
        name: placeholders[_affinity(decl)]
        for _, name, decl, notnull, default, pk in columns
        if notnull and default is None and not pk and name != column
    }
    scratch_key: dict[str, object] = {  # in primary-key order
        name: key if affinity == "text" else 0 for _, name, affinity in key_columns
    }
    return _Scratch(table, scratch_key, filler, column)


def _affinity(declared: str) -> str:
    """SQLite's column affinity rules, for choosing placeholder values."""
    upper = declared.upper()
    if "INT" in upper:
        return "integer"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")) or not upper:
        return "text" if upper else "blob"
    if "BLOB" in upper:
        return "blob"
    return "real"
