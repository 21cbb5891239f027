"""Talking to a running node through its control socket (HTTP/1.1 + JSON on a Unix socket).

Used by the CLI, the demo and scripts: the standard library's HTTP client over a Unix socket.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from replicator.errors import ReplicationError

__all__ = ["ControlClient", "NodeUnreachable", "RequestFailed"]


class NodeUnreachable(ReplicationError):
    """Nothing answers on the control socket (the node is not running, or another path)."""


class RequestFailed(ReplicationError):
    """The node answered with an error: ``status`` and its ``{"error", "details"}``."""

    def __init__(self, status: int, error: str, details: str) -> None:
        super().__init__(error, op="control", hint=details or None)
        self.status = status
        self.error = error
        self.details = details


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("replicator", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def text(self, path: str) -> str:
        """A plain-text resource (``/metrics``)."""
        status, payload = self._exchange("GET", path, None)
        if status >= 400:
            raise RequestFailed(status, f"HTTP {status}", payload.decode(errors="replace"))
        return payload.decode()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self._exchange(method, path, body)
        try:
            decoded = json.loads(payload) if payload else None
        except ValueError:
            raise RequestFailed(status, "the node's answer is not JSON", payload[:200].decode(
                errors="replace")) from None  # fmt: skip
        if status >= 400:
            error = decoded if isinstance(decoded, dict) else {}
            raise RequestFailed(
                status, str(error.get("error", f"HTTP {status}")), str(error.get("details", ""))
            )
        return decoded

    def _exchange(self, method: str, path: str, body: Any) -> tuple[int, bytes]:
        connection = _UnixConnection(self.socket_path, self.timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except FileNotFoundError:
            raise NodeUnreachable(
                f"no control socket at {self.socket_path}",
                op="control",
                hint="is the node running? pass --socket PATH or -c FILE",
            ) from None
        except ConnectionRefusedError:
            raise NodeUnreachable(
                f"nothing answers on {self.socket_path}",
                op="control",
                hint="the node is not running (a stale socket file)",
            ) from None
        except PermissionError:
            raise NodeUnreachable(
                f"not allowed to use {self.socket_path}",
                op="control",
                hint="run as the node's user or root",
            ) from None
        except (TimeoutError, OSError, http.client.HTTPException) as error:
            raise NodeUnreachable(
                f"the node at {self.socket_path} did not answer: {error}", op="control"
            ) from None
        finally:
            connection.close()
