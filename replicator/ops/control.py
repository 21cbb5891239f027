"""The control socket: HTTP/1.1 + JSON on a Unix socket, for the CLI, scripts and curl.

    curl --unix-socket /run/replicator/control.sock http://x/api/replication/status

HTTP is parsed by h11 (sans-IO, like our own protocol), the socket is created with mode 0600,
and a connection from another user is refused unless that user is root (SO_PEERCRED). A socket
file left by a crash is replaced only if it is a socket and nothing answers on it. Errors are
JSON ``{"error", "details"}`` with a fitting status code; a handler that fails is answered
(503 when the state database refuses writes, else 500) and logged, never raised into the node.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, unquote

import h11
import trio

from replicator.capture.sqlite_errors import refusal
from replicator.errors import ReplicationError
from replicator.log import get_logger

__all__ = ["ControlError", "Request", "Response", "Routes", "serve_control"]

_log = get_logger("control")
MAX_REQUEST_BYTES = 1 << 20
REQUEST_TIMEOUT = 10.0


class ControlError(ReplicationError):
    def __init__(self, status: int, error: str, details: str = "") -> None:
        super().__init__(error, op="control")
        self.status = status
        self.details = details


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)  # the path's {name} segments

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as error:
            raise ControlError(400, "request body is not JSON", str(error)) from None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: Any


Handler = Callable[[Request], Awaitable[Response]]
Routes = Mapping[tuple[str, str], Handler]


async def serve_control(
    path: str, routes: Routes, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    listener = await _listen(path)
    _log.info("control socket ready", path=path)
    task_status.started()

    async def handle(stream: trio.SocketStream) -> None:
        # A connection's failure is that connection's: escaping here, it would cancel the
        # whole node (and this finally would unlink the socket).
        try:
            await _serve_one(stream, routes)
        except Exception as error:
            _log.error("control connection failed", error=str(error), exc_info=error)

    try:
        async with listener:
            await trio.serve_listeners(handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _listen(path: str) -> trio.SocketListener:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    await _remove_stale(path)
    # Bound and listening under a temporary name, then renamed: the path appears only once it
    # answers, and only with mode 0600 (the umask covers the bind, with no await in between).
    staging = os.path.join(directory, f".{os.getpid()}.sock")
    if len(staging) > len(path):  # AF_UNIX paths are short: never longer than the real one
        staging = path
    if staging != path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)  # left by a crash of this same pid number
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        raw.bind(staging)
    except BaseException:
        raw.close()
        raise
    finally:
        os.umask(old_umask)
    try:
        os.chmod(staging, 0o600)
        raw.listen(16)
        if staging != path:
            os.rename(staging, path)
    except BaseException:
        raw.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(raw))


async def _remove_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ReplicationError(
            f"control socket path {path} exists and is not a socket",
            op="control",
            hint="remove it or set replication.control_socket elsewhere",
        )
    try:
        probe = await trio.open_unix_socket(path)
    except OSError:
        os.unlink(path)  # left by a crash: nothing answers
        return
    await probe.aclose()
    raise ReplicationError(
        f"another process answers on the control socket {path}",
        op="control",
        hint="is another replicator node running with this configuration?",
    )


def _peer_uid(stream: trio.SocketStream) -> int | None:
    try:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def _serve_one(stream: trio.SocketStream, routes: Routes) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = await _read_request(stream, connection)
            if request is None:
                return
            uid = _peer_uid(stream)
            if uid is not None and uid not in (0, os.getuid()):
                refusal = _error("forbidden", "only root or the node's user may use this socket")
                await _send(stream, connection, Response(403, refusal))
                return
            response = await _dispatch(request, routes)
            await _send(stream, connection, response)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as error:
        _log.debug("control connection dropped", reason=str(error))
    finally:
        await trio.aclose_forcefully(stream)


async def _read_request(stream: trio.SocketStream, connection: h11.Connection) -> Request | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            connection.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BYTES:
                raise h11.RemoteProtocolError("request body too large")
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            target, _, query = head.target.decode("ascii", "replace").partition("?")
            return Request(
                head.method.decode("ascii", "replace"),
                target,
                bytes(body),
                dict(parse_qsl(query)),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _match(pattern: str, path: str) -> dict[str, str] | None:
    """``/a/{id}/b`` against ``/a/7/b``: {"id": "7"}; None when it does not match."""
    wanted, given = pattern.split("/"), path.split("/")
    if len(wanted) != len(given):
        return None
    params = {}
    for part, value in zip(wanted, given, strict=True):
        if part.startswith("{") and part.endswith("}"):
            if not value:
                return None
            params[part[1:-1]] = unquote(value)
        elif part != value:
            return None
    return params


async def _dispatch(request: Request, routes: Routes) -> Response:
    path = request.path.rstrip("/") or "/"
    handler = routes.get((request.method, path))
    allowed = sorted({method for method, pattern in routes if _match(pattern, path) is not None})
    if handler is None:
        for (method, pattern), candidate in routes.items():
            params = _match(pattern, path) if method == request.method else None
            if params is not None:
                handler, request = candidate, replace(request, params=params)
                break
    if handler is None:
        if allowed:
            details = f"{request.method} {path}; allowed: {', '.join(allowed)}"
            return Response(405, _error("method not allowed", details))
        return Response(404, _error("not found", f"no such path: {path}"))
    try:
        return await handler(request)
    except ControlError as error:
        return Response(error.status, _error(error.message, error.details))
    except ReplicationError as error:
        return Response(500, _error(error.message, error.hint or ""))
    except Exception as error:  # answered, never raised: a failed request must not end the node
        refused = refusal(error)
        if refused is not None:  # a checkpoint or VACUUM on a full disk, say
            _log.warning("request refused by the state database", path=path, error=str(refused))
            return Response(503, _error("the state database refuses writes", str(refused)))
        _log.error("request failed", path=path, error=str(error), exc_info=error)
        return Response(500, _error("request failed", f"{type(error).__name__}: {error}"))


def _error(error: str, details: str) -> dict[str, str]:
    return {"error": error, "details": details}


async def _send(stream: trio.SocketStream, connection: h11.Connection, response: Response) -> None:
    if isinstance(response.body, str | bytes):
        payload = response.body.encode() if isinstance(response.body, str) else response.body
        content_type = b"text/plain; version=0.0.4; charset=utf-8"
    else:
        payload = json.dumps(response.body, indent=2, default=str).encode() + b"\n"
        content_type = b"application/json"
    head = h11.Response(
        status_code=response.status,
        headers=[
            (b"content-type", content_type),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ],
    )
    await stream.send_all(connection.send(head) + connection.send(h11.Data(data=payload))
                          + connection.send(h11.EndOfMessage()))  # fmt: skip
