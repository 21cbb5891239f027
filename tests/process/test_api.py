"""The control API of a running pair: every path, its errors, the socket's protections, and
metrics that move when changes replicate."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replicator.harness import NodeProcess, wait_until

INSERT = "INSERT INTO dhcp_leases (mac, ip, expires) VALUES (?, ?, ?)"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """A manual-strategy pair with rows and one open conflict."""
    tmp_path = tmp_path_factory.mktemp("api")
    node1 = NodeProcess(tmp_path, "node1", "127.0.0.1", strategy="manual")
    node2 = NodeProcess(tmp_path, "node2", "127.0.0.2", strategy="manual")
    node1.start([node2])
    node2.start([node1])
    try:
        with node1.app() as app:
            app.executemany(INSERT, [(f"m{i}", f"10.0.0.{i}", i) for i in range(20)])
        wait_until(lambda: node2.count("dhcp_leases") == 20, what="node2 to receive the rows")
        for node in (node1, node2):
            node.post("/api/replication/pause")
        for node, ip in ((node1, "10.1.1.1"), (node2, "10.2.2.2")):
            with node.app() as app:
                app.execute("UPDATE dhcp_leases SET ip = ? WHERE mac = 'm1'", (ip,))
        for node in (node1, node2):
            node.post("/api/replication/resume")
        wait_until(lambda: bool(node1.api("GET", "/api/replication/conflicts")[1]["conflicts"]),
                   what="the conflict on node1")  # fmt: skip
        yield node1, node2
    finally:
        node1.stop()
        node2.stop()


READS = [
    "/api/replication/status",
    "/api/replication/peers",
    "/api/replication/lag",
    "/api/replication/queue",
    "/api/replication/checkpoint",
    "/api/replication/conflicts",
    "/api/replication/conflicts?status=all&limit=5",
    "/api/state/status",
    "/api/state/stats",
    "/api/state/backups",
]


@pytest.mark.parametrize("path", READS)
def test_every_read_path_answers_json(pair: tuple[NodeProcess, NodeProcess], path: str) -> None:
    node1, _ = pair
    code, body = node1.api("GET", path)
    assert code == 200, body
    assert isinstance(body, dict)


def test_status_peers_lag_and_queue_describe_the_pair(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    node1, _ = pair
    status = node1.api("GET", "/api/replication/status")[1]
    assert status["node_id"] == "node1"
    assert status["conflicts"]["open"] >= 1
    peers = node1.api("GET", "/api/replication/peers")[1]["peers"]
    assert [(p["id"], p["state"]) for p in peers] == [("node2", "connected")]
    lag = node1.api("GET", "/api/replication/lag")[1]
    assert lag["lagging"] == []
    assert lag["max_lag_seconds"] == 10.0
    queue = node1.api("GET", "/api/replication/queue")[1]
    assert queue["peers"][0]["id"] == "node2"
    assert queue["paused"] is False


def test_conflicts_are_listed_shown_and_resolved_everywhere(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    node1, node2 = pair
    (conflict,) = node1.api("GET", "/api/replication/conflicts")[1]["conflicts"]
    ident = conflict["id"]
    code, shown = node1.api("GET", f"/api/replication/conflicts/{ident}")
    assert (code, shown["table"], shown["key"]) == (200, "dhcp_leases", "'m1'")
    code, resolved = node1.api("POST", f"/api/replication/conflicts/{ident}/resolve",
                               {"use": "remote"})  # fmt: skip
    assert (code, resolved["status"]) == (200, "resolved")
    wait_until(lambda: node2.api("GET", f"/api/replication/conflicts/{ident}")[1]["status"]
               == "resolved", what="node2 to close the conflict too")  # fmt: skip
    code, again = node1.api("POST", f"/api/replication/conflicts/{ident}/resolve",
                            {"use": "local"})  # fmt: skip
    assert code == 409
    assert "already resolved" in again["error"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("GET", "/api/replication/conflicts/nope", None, 404, "no conflict 'nope'"),
        ("POST", "/api/replication/conflicts/nope/resolve", {"use": "local"}, 404, "no conflict"),
        (
            "POST",
            "/api/replication/conflicts/x/resolve",
            {"use": "mine"},
            400,
            "invalid resolution",
        ),
        ("GET", "/api/replication/conflicts?status=weird", None, 400, "invalid status"),
        ("DELETE", "/api/replication/status", None, 405, "method not allowed"),
        ("GET", "/api/replication/pause", None, 405, "method not allowed"),
        ("GET", "/api/nowhere", None, 404, "not found"),
        ("POST", "/api/replication/resync", {"peer": "nodeX"}, 404, "no configured peer"),
        ("POST", "/api/state/backups", {}, 409, "backups are not enabled"),
        ("GET", "/api/state/backups/daily-1", None, 404, "backups are not enabled"),
        ("POST", "/api/state/backups/daily-1/restore", None, 404, "backups are not enabled"),
    ],
)
def test_errors_are_json_with_a_fitting_status(
    pair: tuple[NodeProcess, NodeProcess],
    method: str,
    path: str,
    body: Any,
    status: int,
    error: str,
) -> None:
    node1, _ = pair
    code, answer = node1.api(method, path, body)
    assert code == status
    assert set(answer) == {"error", "details"}
    assert error in answer["error"]


def test_a_body_that_is_not_json_is_refused(pair: tuple[NodeProcess, NodeProcess]) -> None:
    node1, _ = pair
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(node1.control_socket))
        client.sendall(b"POST /api/replication/resync HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 5\r\n\r\n{nope")  # fmt: skip
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400")
    assert b"request body is not JSON" in reply


def test_actions_pause_resume_checkpoint_validate_and_state_upkeep(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    node1, _ = pair
    assert node1.post("/api/replication/pause") == {"paused": True}
    assert node1.api("GET", "/api/replication/queue")[1]["paused"] is True
    assert node1.post("/api/replication/resume") == {"paused": False}
    checkpoint = node1.post("/api/replication/checkpoint")
    listed = node1.api("GET", "/api/replication/checkpoint")[1]["checkpoints"]
    assert listed[0]["id"] == checkpoint["id"]
    validation = node1.post("/api/replication/validate")
    assert set(validation["peers"]) == {"node2"}
    assert validation["tables"]["dhcp_leases"]["rows"] == 20
    if validation["peers"]["node2"]["compared"]:
        assert validation["consistent"] is True
    state = node1.post("/api/state/validate")
    assert (state["ok"], state["integrity_check"], state["problems"]) == (True, "ok", [])
    assert node1.api("GET", "/api/state/status")[1]["last_validation"]["ok"] is True
    saved = node1.post("/api/state/save")
    assert saved["saved"] is True
    compacted = node1.post("/api/state/compact")
    assert compacted["bytes_after"] <= compacted["bytes_before"]
    stats = node1.api("GET", "/api/state/stats")[1]
    assert stats["tables"]["dhcp_leases"]["rows"] == 20


def test_metrics_parse_and_move_when_changes_replicate(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    node1, node2 = pair

    def sent() -> float:
        text = _raw(node1, "/metrics")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "replicator_peer_changes_sent_total":
                    return float(sample.value)
        raise AssertionError("no replicator_peer_changes_sent_total")

    before = sent()
    with node1.app() as app:
        app.execute(INSERT, ("metrics", "10.7.7.7", 1))
    wait_until(lambda: sent() > before, what="the sent counter to move")
    assert "replicator_peer_lag_seconds" in _raw(node1, "/metrics")
    assert "replicator_node_info" in _raw(node2, "/metrics")


def test_the_socket_is_private_and_refuses_other_users(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    node1, _ = pair
    path = node1.control_socket
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    # Let another user reach the socket (a hard link outside the 0700 test directory, the
    # socket itself opened up): the node must still refuse it, by its credentials.
    reachable = Path(tempfile.gettempdir()) / f"replicator-api-test-{os.getpid()}.sock"
    os.link(path, reachable)
    os.chmod(path, 0o666)
    try:
        probe = (
            "import os, socket, sys; os.setgid(65534); os.setuid(65534);"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            "s.sendall(b'GET /api/replication/status HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n');"
            "print(s.recv(4096).decode())"
        )
        result = subprocess.run([sys.executable, "-c", probe, str(reachable)],
                                capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    finally:
        os.chmod(path, 0o600)
        reachable.unlink()
    assert result.stdout.startswith("HTTP/1.1 403")
    assert "forbidden" in result.stdout


def _raw(node: NodeProcess, path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(node.control_socket))
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()
