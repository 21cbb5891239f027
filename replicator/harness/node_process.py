"""One `replicator run` process on this machine, seen from outside as an operator sees it: its
config file, its JSON log, its control socket and its SQLite file."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from replicator.harness.addresses import free_port
from replicator.harness.checkout import ROOT, SCHEMA
from replicator.harness.hcl import NodeConfig
from replicator.harness.processes import spawn, stop_processes
from replicator.harness.waiting import wait_until

__all__ = ["TEST_SECRET", "NodeProcess"]

TEST_SECRET = "test cluster passphrase, 16+ chars"  # noqa: S105 (a test cluster's, not a secret)


class NodeProcess:
    """A node with its own directory (``directory/node_id``), state file and log file.

    The settings default to a test cluster's: sync and heartbeats every 200 ms, a passphrase
    in the file. A caller with other needs (the demo, the bench) overrides ``config``; one that
    must register or wrap the process overrides ``spawn``. ``schema`` is written to the node's
    directory as schema.sql (None: the config names a schema of its own).
    """

    def __init__(
        self,
        directory: Path,
        node_id: str,
        host: str,
        *,
        secret: str = TEST_SECRET,
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
        schema: str | None = SCHEMA,
        cwd: Path = ROOT,
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
        self.cwd = cwd
        if schema is not None:
            (self.directory / "schema.sql").write_text(schema)
        self.process: subprocess.Popen[bytes] | None = None
        self.open_files_limit: int | None = None  # RLIMIT_NOFILE (soft and hard) if set

    # -- the config ------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.directory / "node.hcl"

    def config(self, peers: Sequence[NodeProcess]) -> NodeConfig:
        return NodeConfig(
            node_id=self.node_id,
            listen_addr=f"{self.host}:{self.port}",
            peers=[(peer.node_id, self.peer_address(peer)) for peer in peers],
            cluster_id="test",
            auth={"secret_key": self.secret},
            state_path=str(self.db_path),
            schema="schema.sql",
            state_extra=self.state_extra,
            mode=self.mode,
            sync={
                "interval": "200ms",
                "batch_size": self.batch_size,
                "truncate_interval": self.truncate_interval,
                "log_retention": self.log_retention,
                "max_lag": self.max_lag,
                "heartbeat_interval": "200ms",
                "liveness_timeout": self.liveness_timeout,
            },
            data=self.tables,
            strategy=self.strategy,
            extra=self.extra,
        )

    def write_config(self, peers: Sequence[NodeProcess]) -> Path:
        self.config_path.write_text(self.config(peers).render())
        return self.config_path

    def peer_address(self, peer: NodeProcess) -> str:
        return self.peer_addresses.get(peer.node_id, f"{peer.host}:{peer.port}")

    # -- the process -----------------------------------------------------------------------

    def start(self, peers: Sequence[NodeProcess]) -> None:
        self.start_with_config(self.write_config(peers))

    def start_with_config(self, config: Path) -> None:
        self.process = self.spawn(
            [sys.executable, "-m", "replicator", "run", "-c", str(config), "--log-format", "json"]
        )

    def spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        limit = self.open_files_limit
        limit_open_files: Callable[[], None] | None = None
        if limit is not None:

            def limit_open_files() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        return spawn(args, self.log_path, cwd=self.cwd, preexec_fn=limit_open_files)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """``sig``, then SIGKILL after ``timeout`` s; the exit status (None: never started)."""
        if self.process is None:
            return None
        stop_processes([self.process], sig, timeout)
        return self.process.returncode

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the node for the block (its sockets stay open), SIGCONT after."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    # -- the log -----------------------------------------------------------------------------

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

    def wait_started(self) -> None:
        wait_until(lambda: bool(self.logged("node started")), what=f"{self.node_id} to start")

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- the control socket ------------------------------------------------------------------

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
        reply_head, _, reply = data.partition(b"\r\n\r\n")
        return int(reply_head.split()[1]), json.loads(reply)

    def post(self, path: str, body: Any = None) -> dict[str, Any]:
        code, reply = self.api("POST", path, body)
        assert code in (200, 201, 202), reply
        return dict(reply)

    def status(self) -> dict[str, Any]:
        code, body = self.api("GET", "/api/replication/status")
        assert code == 200, body
        return dict(body)

    # -- the file ----------------------------------------------------------------------------

    def app(self) -> sqlite3.Connection:
        """An application connection: plain sqlite3, as the appliance's own code would use."""
        self.wait_started()
        conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=10)
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    def count(self, table: str) -> int:
        return int(self._query(f"SELECT count(*) FROM {table}")[0][0])

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        return self._query(f"SELECT * FROM {table} ORDER BY 1, 2, 3")

    def read(
        self,
        sql: str,
        args: Sequence[Any] = (),
        *,
        read_only: bool = False,
        timeout: float = 10.0,
    ) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` on the node's file; ``read_only`` never creates the file."""
        target = f"{self.db_path.as_uri()}?mode=ro" if read_only else str(self.db_path)
        conn = sqlite3.connect(target, uri=read_only, timeout=timeout)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` on the node's file. A node still starting may not have created its
        tables yet: then it is waited for (once it has started, a missing table is an error)."""
        try:
            return self.read(sql)
        except sqlite3.OperationalError as error:
            if "no such table" not in str(error) or self.logged("node started"):
                raise
        self.wait_started()
        return self.read(sql)
