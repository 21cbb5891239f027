"""Real node processes for multi-node tests: configs in a temp dir, JSON logs, polling helpers."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = (ROOT / "conf" / "schema.sql").read_text()
SECRET = "test cluster passphrase, 16+ chars"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def wait_until(
    condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class NodeProcess:
    """One `replicator run` process with its own directory, state file and log file."""

    def __init__(
        self,
        directory: Path,
        node_id: str,
        host: str,
        *,
        secret: str = SECRET,
        strategy: str = "timestamp",
        tables: str = "dhcp_leases = true, dns_records = true",
        mode: str = "active-active",
        truncate_interval: str = "30s",
        log_retention: str = "7d",
        max_lag: str = "10s",
        liveness_timeout: str = "10s",
        batch_size: int = 500,
        extra: str = "",
        state_extra: str = "",
        db_path: Path | None = None,
    ) -> None:
        self.extra = extra  # more lines for the replication block, as HCL
        self.state_extra = state_extra  # and for the state block
        # Where this node dials each peer, when not the peer's own address (a proxy, say).
        self.peer_addresses: dict[str, str] = {}
        self.liveness_timeout = liveness_timeout
        self.batch_size = batch_size
        self.max_lag = max_lag
        self.mode = mode
        self.truncate_interval = truncate_interval
        self.log_retention = log_retention
        self.directory = directory / node_id
        self.directory.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.host = host
        self.port = free_port(host)
        self.secret = secret
        self.strategy = strategy
        self.tables = tables
        self.db_path = db_path or self.directory / "state.db"
        self.log_path = self.directory / "node.log"
        (self.directory / "schema.sql").write_text(SCHEMA)
        self.process: subprocess.Popen[bytes] | None = None
        self.open_files_limit: int | None = None  # RLIMIT_NOFILE (soft and hard) if set

    def write_config(self, peers: list[NodeProcess]) -> Path:
        peer_lines = ",\n".join(
            f'    {{ id = "{p.node_id}", address = "{self.peer_address(p)}" }}' for p in peers
        )
        config = self.directory / "node.hcl"
        config.write_text(
            f"""
state {{
  path   = "{self.db_path}"
  schema = "schema.sql"
{self.state_extra}
}}
replication {{
  mode        = "{self.mode}"
  node_id     = "{self.node_id}"
  cluster_id  = "test"
  listen_addr = "{self.host}:{self.port}"
  peers = [
{peer_lines}
  ]
  auth = {{ secret_key = "{self.secret}" }}
  sync = {{ interval = "200ms", batch_size = {self.batch_size},
           truncate_interval = "{self.truncate_interval}",
           log_retention = "{self.log_retention}",
           max_lag = "{self.max_lag}", heartbeat_interval = "200ms",
           liveness_timeout = "{self.liveness_timeout}" }}
  data = {{ {self.tables} }}
  conflict_resolution = {{ strategy = "{self.strategy}" }}
  control_socket = "control.sock"
{self.extra}
}}
"""
        )
        return config

    def peer_address(self, peer: NodeProcess) -> str:
        return self.peer_addresses.get(peer.node_id, f"{peer.host}:{peer.port}")

    def start(self, peers: list[NodeProcess]) -> None:
        self.start_with_config(self.write_config(peers))

    def start_with_config(self, config: Path) -> None:
        log = self.log_path.open("ab")
        limit = self.open_files_limit

        def limit_open_files() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.process = subprocess.Popen(
            [sys.executable, "-m", "replicator", "run", "-c", str(config), "--log-format", "json"],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=limit_open_files if limit is not None else None,  # noqa: PLW1509
        )
        log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the node for the block (its sockets stay open), SIGCONT after."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def app(self) -> sqlite3.Connection:
        """An application connection: plain sqlite3, as the appliance's own code would use."""
        wait_until(lambda: bool(self.logged("node started")), what=f"{self.node_id} to start")
        conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=10)
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    @property
    def control_socket(self) -> Path:
        return self.directory / "control.sock"

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request on the control socket, as curl --unix-socket would make it."""
        wait_until(self.control_socket.exists, what=f"{self.node_id}'s control socket")
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
        if payload:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(self.control_socket))
            client.sendall(f"{head}\r\n".encode() + payload)
            data = b""
            while chunk := client.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    def post(self, path: str, body: Any = None) -> dict[str, Any]:
        code, reply = self.api("POST", path, body)
        assert code in (200, 201, 202), reply
        return dict(reply)

    def status(self) -> dict[str, Any]:
        code, body = self.api("GET", "/api/replication/status")
        assert code == 200, body
        return dict(body)

    def logs(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"event": line})
        return lines

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            line
            for line in self.logs()
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    def count(self, table: str) -> int:
        return int(self._query(f"SELECT count(*) FROM {table}")[0][0])

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        return self._query(f"SELECT * FROM {table} ORDER BY 1, 2, 3")

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` on the node's file. A node still starting may not have created its
        tables yet: then it is waited for (once it has started, a missing table is an error)."""
        try:
            return self._read(sql)
        except sqlite3.OperationalError as error:
            if "no such table" not in str(error) or self.logged("node started"):
                raise
        wait_until(lambda: bool(self.logged("node started")), what=f"{self.node_id} to start")
        return self._read(sql)

    def _read(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.db_path, timeout=10)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
