"""The `replicator` command against real node processes: every operator command in text and
JSON form, and the exit codes scripts rely on (0 ok, 1 problem, 2 usage, 3 unreachable, 4 the
node's error).

Most commands run in-process through click's CliRunner (fast); one test runs the installed
entry point as a subprocess to check the exit codes end to end. Pairs of nodes are shared by
module-scoped fixtures where a test leaves them as it found them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from replicator.cli import render as fmt
from replicator.cli.app import (
    EXIT_NODE_ERROR,
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    main,
)
from replicator.config import load_config
from replicator.harness import ROOT, NodeProcess, wait_until

INSERT = "INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, ?)"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def answer(result: Result) -> Any:
    assert result.exit_code == EXIT_OK, result.output
    return json.loads(result.stdout)


BACKUPS = 'backup = { enabled = true, directory = "backups" }'


def start_pair(directory: Path, **options: str) -> tuple[NodeProcess, NodeProcess]:
    node1 = NodeProcess(directory, "node1", "127.0.0.1", **options)
    node2 = NodeProcess(directory, "node2", "127.0.0.2", **options)
    node1.start([node2])
    node2.start([node1])
    return node1, node2


def connected(node: NodeProcess) -> bool:
    return all(peer["state"] == "connected" for peer in node.status()["peers"])


def wait_connected(*nodes: NodeProcess) -> None:
    for node in nodes:
        node.app().close()

        def links_up(node: NodeProcess = node) -> bool:
            return connected(node)

        wait_until(links_up, what=f"{node.node_id}'s links")


def stop(*nodes: NodeProcess) -> None:
    for node in nodes:
        node.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """A connected active-active pair holding 200 leases (timestamp strategy)."""
    node1, node2 = start_pair(tmp_path_factory.mktemp("pair"), state_extra=BACKUPS)
    try:
        wait_connected(node1, node2)
        app = node1.app()
        with app:
            app.executemany(INSERT, [(f"m{i:04d}", f"10.0.0.{i}", i) for i in range(200)])
        app.close()
        wait_until(lambda: node2.count("dhcp_leases") == 200, what="the leases on node2")
        yield node1, node2
    finally:
        stop(node1, node2)


@pytest.fixture(scope="module")
def manual_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[NodeProcess, NodeProcess, str]]:
    """A pair with the manual strategy and one open conflict on lease 'shared', provoked by
    updating it on both nodes while both have replication paused; yields its id too."""
    node1, node2 = start_pair(tmp_path_factory.mktemp("manual"), strategy="manual")
    try:
        wait_connected(node1, node2)
        node1.app().execute(INSERT, ("shared", "10.1.0.1", 1))
        wait_until(lambda: node2.count("dhcp_leases") == 1, what="the shared lease")
        for node in (node1, node2):
            node.post("/api/replication/pause")
        for node in (node1, node2):
            node.app().execute(
                "UPDATE dhcp_leases SET hostname = ? WHERE mac = 'shared'", (f"{node.node_id}",)
            )
        for node in (node1, node2):
            node.post("/api/replication/resume")

        def open_conflicts(node: NodeProcess) -> list[dict[str, Any]]:
            code, body = node.api("GET", "/api/replication/conflicts?status=open")
            assert code == 200, body
            return list(body["conflicts"])

        wait_until(
            lambda: len(open_conflicts(node1)) == 1 and len(open_conflicts(node2)) == 1,
            what="the conflict queued on both nodes",
        )
        yield node1, node2, open_conflicts(node1)[0]["id"]
    finally:
        stop(node1, node2)


def sock(node: NodeProcess) -> list[str]:
    return ["--socket", str(node.control_socket)]


# ---------------------------------------------------------------------------------------------
# Every read-mostly command, as text and as JSON


# (command, a line fragment of the text form, keys of the JSON form)
COMMANDS: list[tuple[list[str], str, set[str]]] = [
    (["status"], "PEER   STATE      ADDRESS", {"node_id", "peers", "alarms", "version_vector"}),
    (["status", "--verbose", "--interval", "0"], "Version vector", {"divergence", "snapshots"}),
    (["peers"], "node2  connected", {"node_id", "peers"}),
    (["lag"], "BEHIND (CHANGES)", {"lagging", "max_lag_seconds", "worst_lag_seconds"}),
    (["queue", "status"], "IN FLIGHT", {"peers", "conflicts_open", "paused"}),
    (["resync"], "Resync requested: pulling its log again from node2", {"peer", "full"}),
    (["checkpoint"], "taken", {"id", "taken_at", "version_vector", "peers"}),
    (["validate"], "Consistent: every table matches every peer.", {"consistent", "tables"}),
    (["promote"], "This node's role is peer", {"role", "changed"}),
    (["conflicts", "list"], "No open conflicts.", {"conflicts", "status"}),
    (["conflicts", "list", "--status", "all"], "No conflicts.", {"conflicts"}),
    (["debug", "--peer", "node2"], "Peer node2, as seen from node1", {"peer", "alarms"}),
    (["backup", "list"], "scheduled", {"enabled", "directory", "backups"}),
    (["state", "status"], "journal mode     wal", {"path", "journal_mode", "size_bytes"}),
    (["state", "stats"], "dhcp_leases   200", {"tables", "log_entries", "pages"}),
    (["state", "validate"], "State database OK", {"ok", "problems", "integrity_check"}),
    (["state", "compact"], "Compacted: ", {"bytes_before", "bytes_after"}),
]


@pytest.mark.parametrize(
    ("command", "text", "keys"), COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS]
)
def test_command_prints_text_and_json(
    pair: tuple[NodeProcess, NodeProcess], command: list[str], text: str, keys: set[str]
) -> None:
    node1, _ = pair
    human = cli(*command, *sock(node1))
    assert human.exit_code == EXIT_OK, human.output
    assert text in human.stdout
    assert not human.stdout.lstrip().startswith("{")
    machine = answer(cli(*command, *sock(node1), "--json"))
    assert keys <= set(machine)


def test_status_summarises_the_node_and_its_peers(pair: tuple[NodeProcess, NodeProcess]) -> None:
    node1, node2 = pair
    out = cli("status", *sock(node1)).stdout
    assert out.startswith("Node node1: peer (active-active), cluster test, up ")
    assert "replication   running" in out
    assert "log position  200" in out
    assert "alarms        none" in out
    assert f"node2  connected  127.0.0.2:{node2.port}" in out
    assert "ALARMS" not in out


def test_status_verbose_measures_throughput_and_shows_every_section(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    node1, _ = pair
    result = cli("status", "--verbose", "--interval", "0.3", *sock(node1))
    assert result.exit_code == EXIT_OK, result.output
    out = result.stdout
    for section in ("Node", "Alarms", "Version vector", "Snapshots", "Divergence",
                    "Checkpoints", "Conflicts"):  # fmt: skip
        assert f"\n{section}\n" in f"\n{out}", section
    assert "Peers (throughput over " in out
    assert "RATE OUT" in out
    assert "RATE IN" in out
    assert "mode            active-active (role: peer)" in out


def test_commands_find_the_socket_through_the_config(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    node1, node2 = pair
    config = node1.write_config([node2])
    assert answer(cli("status", "-c", str(config), "--json"))["node_id"] == "node1"
    assert answer(cli("lag", "--config", str(config), "--json"))["node_id"] == "node1"


def test_pause_and_resume(pair: tuple[NodeProcess, NodeProcess]) -> None:
    node1, _ = pair
    try:
        paused = cli("pause", *sock(node1))
        assert paused.exit_code == EXIT_OK, paused.output
        assert "Replication paused" in paused.stdout
        assert "PAUSED" in cli("status", *sock(node1)).stdout
        assert answer(cli("queue", "status", *sock(node1), "--json"))["paused"] is True
        assert answer(cli("pause", *sock(node1), "--json")) == {"paused": True}
    finally:
        resumed = cli("resume", *sock(node1))
    assert resumed.exit_code == EXIT_OK, resumed.output
    assert resumed.stdout == "Replication resumed.\n"
    assert answer(cli("resume", *sock(node1), "--json")) == {"paused": False}
    assert "replication   running" in cli("status", *sock(node1)).stdout


def test_full_resync_waits_for_the_snapshot(pair: tuple[NodeProcess, NodeProcess]) -> None:
    node1, node2 = pair
    result = cli("resync", "--full", "--peer", "node2", "--wait", "--timeout", "20", *sock(node1))
    assert result.exit_code == EXIT_OK, result.output
    assert "pulling its whole state (a snapshot) from node2" in result.stdout
    assert "Snapshot from node2 done: 100.0% (200/200 rows" in result.stdout
    # The next snapshot holds one more row: a report distinguishable from the first one's.
    node2.app().execute(INSERT, ("resync", "10.3.0.1", 1))
    machine = answer(cli("resync", "--full", "--wait", "--timeout", "20", *sock(node1), "--json"))
    assert machine["full"] is True
    assert machine["snapshot"]["state"] == "done"
    assert cli("resync", "--wait", *sock(node1)).exit_code == EXIT_USAGE


def test_debug_reports_one_peer(pair: tuple[NodeProcess, NodeProcess]) -> None:
    node1, node2 = pair
    cli("checkpoint", *sock(node1))
    out = cli("debug", "--peer", "node2", *sock(node1)).stdout
    assert f"address       127.0.0.2:{node2.port} (from the config)" in out
    assert "state         connected" in out
    # (The resync just before may leave a change or a batch in flight for a moment.)
    assert re.search(r"\n  lag           \d+ changes?, \d+(\.\d+)?m?s \(max_lag 10s\)\n", out), out
    assert "checkpoint    #" in out
    info = answer(cli("debug", "--peer", "node2", *sock(node1), "--json"))
    assert info["peer"]["id"] == "node2"
    assert info["over_max_lag"] is False
    assert info["divergence"]["divergent_tables"] == []
    unknown = cli("debug", "--peer", "node9", *sock(node1))
    assert unknown.exit_code == EXIT_USAGE
    assert "node1 has no peer 'node9' (peers: node2)" in unknown.stderr


# ---------------------------------------------------------------------------------------------
# Exit codes


def test_unreachable_node_exits_3(tmp_path: Path) -> None:
    missing = tmp_path / "control.sock"
    result = cli("status", "--socket", str(missing))
    assert result.exit_code == EXIT_UNREACHABLE
    assert result.stdout == ""
    assert result.stderr.startswith(f"replicator: no control socket at {missing}")
    assert result.stderr.count("\n") == 1


def test_the_nodes_errors_exit_4_with_one_line(pair: tuple[NodeProcess, NodeProcess]) -> None:
    node1, _ = pair
    for command, line in [
        (["conflicts", "show", "nope"], "no conflict 'nope': see /api/replication/conflicts"),
        (["conflicts", "resolve", "nope", "--use", "local"], "no conflict 'nope'"),
        (["resync", "--peer", "node9"], "no configured peer 'node9': configured: node2"),
        (["backup", "restore", "backup-1.db", "--yes"], "no backup 'backup-1.db'"),
    ]:  # fmt: skip
        result = cli(*command, *sock(node1))
        assert result.exit_code == EXIT_NODE_ERROR, (command, result.output)
        assert result.stderr.startswith(f"replicator: {line}"), result.stderr
        assert result.stderr.count("\n") == 1
        assert result.stdout == ""


def test_usage_errors_exit_2(pair: tuple[NodeProcess, NodeProcess], tmp_path: Path) -> None:
    node1, _ = pair
    both = cli("status", "-c", "node.hcl", *sock(node1))
    assert both.exit_code == EXIT_USAGE
    assert "give --socket PATH or -c FILE, not both" in both.stderr
    missing_config = cli("status", "-c", str(tmp_path / "missing.hcl"))
    assert missing_config.exit_code == EXIT_USAGE
    assert "cannot read" in missing_config.stderr
    assert cli("conflicts", "resolve", "x", *sock(node1)).exit_code == EXIT_USAGE  # no --use
    assert cli("test-conflict", *sock(node1)).exit_code == EXIT_USAGE


def test_restore_asks_before_replacing_the_state(pair: tuple[NodeProcess, NodeProcess]) -> None:
    node1, _ = pair
    declined = CliRunner().invoke(main, ["backup", "restore", "b1", *sock(node1)], input="n\n")
    assert declined.exit_code == 1  # click's Abort
    assert "Replace this node's state with backup b1?" in declined.output


def test_exit_codes_end_to_end_through_the_entry_point(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    node1, _ = pair

    def replicator(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "replicator", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    ok = replicator("status", "--socket", str(node1.control_socket))
    assert ok.returncode == EXIT_OK, ok.stderr
    assert "Node node1: peer (active-active)" in ok.stdout
    down = replicator("status", "--socket", str(tmp_path / "nothing.sock"))
    assert down.returncode == EXIT_UNREACHABLE
    assert down.stderr.startswith("replicator: no control socket at ")
    refused = replicator("conflicts", "show", "0123", "--socket", str(node1.control_socket))
    assert refused.returncode == EXIT_NODE_ERROR
    assert refused.stderr == ("replicator: no conflict '0123': see /api/replication/conflicts\n")
    usage = replicator("lag", "--bogus")
    assert usage.returncode == EXIT_USAGE


def test_lag_over_max_lag_exits_1_and_alarms_are_loud(tmp_path: Path) -> None:
    node1, node2 = start_pair(tmp_path, max_lag="500ms")
    try:
        wait_connected(node1, node2)
        assert cli("lag", *sock(node1)).exit_code == EXIT_OK
        with node2.frozen():
            node1.app().execute(INSERT, ("late", "10.9.0.1", 1))
            wait_until(lambda: bool(node1.status()["alarms"]), what="the lag alarm")
            lag = cli("lag", *sock(node1))
            assert lag.exit_code == EXIT_PROBLEM, lag.output
            assert lag.stdout.startswith("ALARMS (1)\n  ! node2 has not acknowledged for ")
            assert "max_lag 500ms" in lag.stdout
            assert " !" in lag.stdout.splitlines()[-1]  # the lagging peer's row is marked
            machine = cli("lag", *sock(node1), "--json")
            assert machine.exit_code == EXIT_PROBLEM
            assert json.loads(machine.stdout)["lagging"]
            status = cli("status", *sock(node1))
            assert status.exit_code == EXIT_OK  # status reports, lag judges
            assert status.stdout.startswith("ALARMS (1)\n")
            debug = cli("debug", "--peer", "node2", *sock(node1))
            assert "EXCEEDED" in debug.stdout
            assert "ALARMS (1)" in debug.stdout
        wait_until(lambda: cli("lag", *sock(node1)).exit_code == EXIT_OK, what="the catch-up")
    finally:
        stop(node1, node2)


def test_a_peer_that_is_down_is_shown_with_its_error(tmp_path: Path) -> None:
    """node1 alone, its peer never started: a change waits for it, so it lags (not 0ms)."""
    node1 = NodeProcess(tmp_path, "node1", "127.0.0.1")
    absent = NodeProcess(tmp_path, "node2", "127.0.0.2")
    node1.start([absent])
    try:
        node1.app().execute(INSERT, ("alone", "10.8.0.1", 1))
        # The first dial fails before the insert is even made: wait for the change as well.
        wait_until(
            lambda: (
                node1.status()["log_position"] >= 1
                and bool(node1.status()["peers"][0]["last_error"])
            ),
            what="a dial error and the change captured",
        )
        status = cli("status", *sock(node1))
        assert status.exit_code == EXIT_OK, status.output
        lines = status.stdout.splitlines()
        peer_row = next(line for line in lines if line.startswith("node2")).split()
        assert peer_row[1] in ("connecting", "disconnected")
        assert peer_row[-2] == "1"  # one change behind...
        assert peer_row[-1].endswith("ms") or peer_row[-1].endswith("s")  # ...for a while
        assert peer_row[-1] != "0ms"
        assert "Last error:\n  node2  cannot connect" in status.stdout
        assert " ago)" in status.stdout  # the error's age
        lag = cli("lag", *sock(node1))
        assert lag.exit_code == EXIT_OK  # not over max_lag: the peer is down, see status
        assert "Not connected: node2" in lag.stdout
    finally:
        stop(node1)


# ---------------------------------------------------------------------------------------------
# Conflicts


def test_conflicts_list_show_and_resolve(
    manual_pair: tuple[NodeProcess, NodeProcess, str],
) -> None:
    node1, node2, ident = manual_pair
    listed = cli("conflicts", "list", *sock(node1))
    assert listed.exit_code == EXIT_OK, listed.output
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["ID", "TABLE", "KEY", "STRATEGY", "WINNER", "STATUS", "DETECTED",
                              "REASON"]  # fmt: skip
    assert row.split()[:6] == [ident, "dhcp_leases", "'shared'", "manual", "remote", "open"]
    assert [c["id"] for c in answer(cli("conflicts", "list", *sock(node1), "--json"))[
        "conflicts"]] == [ident]  # fmt: skip

    shown = cli("conflicts", "show", ident, *sock(node1))
    assert shown.exit_code == EXIT_OK, shown.output
    assert f"Conflict {ident} (open)" in shown.stdout
    assert ["hostname", "node1", "node2", "*"] in [
        line.split() for line in shown.stdout.splitlines()
    ]
    assert f"replicator conflicts resolve {ident} --use local|remote" in shown.stdout
    detail = answer(cli("conflicts", "show", ident, *sock(node1), "--json"))
    assert detail["local_row"]["hostname"] == "node1"
    assert detail["remote_row"]["hostname"] == "node2"

    resolved = cli("conflicts", "resolve", ident, "--use", "local", *sock(node1))
    assert resolved.exit_code == EXIT_OK, resolved.output
    assert f"Conflict {ident} resolved: kept the local row of dhcp_leases 'shared'." in (
        resolved.stdout
    )
    wait_until(lambda: node2.rows("dhcp_leases")[0][2] == "node1", what="the resolution")
    wait_until(
        lambda: not answer(cli("conflicts", "list", *sock(node2), "--json"))["conflicts"],
        what="the conflict closed on node2 too",
    )
    again = cli("conflicts", "resolve", ident, "--use", "remote", *sock(node1), "--json")
    assert again.exit_code == EXIT_NODE_ERROR
    assert again.stderr == f"replicator: conflict {ident} is already resolved\n"
    history = answer(cli("conflicts", "list", "--status", "resolved", *sock(node1), "--json"))
    assert [c["id"] for c in history["conflicts"]] == [ident]


def test_test_conflict_shows_which_write_won(pair: tuple[NodeProcess, NodeProcess]) -> None:
    node1, node2 = pair
    configs = ["-c", str(node1.write_config([node2])), "--peer-config",
               str(node2.write_config([node1]))]  # fmt: skip
    human = cli("test-conflict", *configs)
    assert human.exit_code == EXIT_OK, human.output
    assert "node2's write won (the newer hybrid-logical-clock stamp)" in human.stdout
    assert "conflicts counted on node1: +1 concurrent" in human.stdout
    assert "scratch row deleted on both nodes" in human.stdout
    result = answer(cli("test-conflict", *configs, "--json"))
    assert result["converged"] is True
    assert result["winner"] == "node2"
    assert result["held"] == {"node1": result["written"]["node2"],
                              "node2": result["written"]["node2"]}  # fmt: skip
    assert result["key"]["mac"].startswith("replicator-test-conflict-")
    for node in pair:
        conn = sqlite3.connect(node.db_path)
        left = conn.execute(
            "SELECT count(*) FROM dhcp_leases WHERE mac LIKE 'replicator-test-conflict-%'"
        ).fetchone()[0]
        conn.close()
        assert left == 0
    assert answer(cli("status", *sock(node1), "--json"))["paused"] is False


def test_test_conflict_resolves_what_the_manual_strategy_queues(
    manual_pair: tuple[NodeProcess, NodeProcess, str],
) -> None:
    node1, node2, _ = manual_pair
    configs = ["-c", str(node1.write_config([node2])), "--peer-config",
               str(node2.write_config([node1]))]  # fmt: skip
    result = answer(cli("test-conflict", *configs, "--json"))
    assert result["strategy"] == "manual"
    assert result["converged"] is True
    (queued,) = result["queued_conflicts"]
    shown = answer(cli("conflicts", "show", queued, *sock(node1), "--json"))
    assert shown["status"] == "resolved"


# ---------------------------------------------------------------------------------------------
# keygen


def test_keygen_writes_a_private_key_and_never_overwrites_by_accident(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    made = cli("keygen", str(path))
    assert made.exit_code == EXIT_OK, made.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert len(key) >= 40
    assert f'auth = {{ secret_key_file = "{path}" }}' in made.stdout

    again = cli("keygen", str(path))
    assert again.exit_code == EXIT_PROBLEM
    assert again.stderr.startswith(f"replicator: {path} exists: pass --force")
    assert path.read_text().strip() == key

    path.chmod(0o644)
    replaced = cli("keygen", str(path), "--force")
    assert replaced.exit_code == EXIT_OK, replaced.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() != key
    assert sorted(os.listdir(tmp_path)) == ["cluster.key"]  # no temporary file left

    # A config pointing at it reads the passphrase back.
    node = NodeProcess(tmp_path, "n", "127.0.0.1")
    config = node.write_config([])
    config.write_text(config.read_text().replace(
        f'secret_key = "{node.secret}"', f'secret_key_file = "{path}"'))  # fmt: skip
    assert load_config(config).replication.auth.passphrases()[0] == path.read_text().strip()


# ---------------------------------------------------------------------------------------------
# Formatting


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0ms"), (0.34, "340ms"), (1.23, "1.2s"), (42.4, "42s"), (200, "3m 20s"),
     (3600, "1h"), (7500, "2h 5m"), (3 * 86400 + 4 * 3600, "3d 4h"), (0.9999, "1.0s")],
)  # fmt: skip
def test_durations_read_naturally(seconds: float | None, text: str) -> None:
    assert fmt.duration(seconds) == text


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (4300, "4.2 KiB"),
        (4.1 * 2**20, "4.1 MiB"),
        (3 * 2**40, "3.0 TiB"),
    ],
)
def test_sizes_use_binary_units(n_bytes: float, text: str) -> None:
    assert fmt.size(n_bytes) == text


def test_tables_align_columns() -> None:
    assert fmt.table(["PEER", "LAG"], [("node2", "12"), ("n3", "1")], right={1}) == [
        "PEER   LAG",
        "node2   12",
        "n3       1",
    ]
