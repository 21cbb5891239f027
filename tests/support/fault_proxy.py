"""A fault-injecting TCP proxy for tests that run real node processes.

    proxy = FaultProxy("127.0.0.11", node_b.host, node_b.port)
    node_a.peer_addresses["b"] = proxy.address   # node a dials b through the proxy
    ...
    proxy.cut()        # partition: open connections reset, new ones accepted and reset at once
    proxy.heal()       # forward again
    proxy.reset()      # reset the open connections once; new ones are forwarded as usual
    proxy.delay(0.2)   # hold every chunk 200 ms before passing it on (0 to stop)
    proxy.close()      # stop: every socket closed, the thread joined (call it in teardown)

Every accepted connection gets its own connection to the target, and bytes flow both ways.
"Reset" means abortive close (SO_LINGER 0, so the kernel sends RST): the node on either side
sees its connection fail, as when a link or a NAT table drops it, not an orderly goodbye.

One thread runs a `select` loop over the listener and every connection, with non-blocking
sockets and per-direction buffers (so a peer that stops reading stalls only its own
connection). The controls run inside that loop, and the caller waits until they took effect:
once `cut()` returns, no byte crosses the proxy until `heal()`. `close()` stops the loop,
which closes every socket it owns before the thread ends, so no thread outlives a test and no
socket is left for the garbage collector (unclosed sockets are ResourceWarnings, and warnings
are errors in this test suite). An error inside the loop is re-raised by the next control call
or by `close()`, rather than lost in a thread.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["FaultProxy"]

_CHUNK = 65536
_BUFFER_LIMIT = 1 << 20  # stop reading a side while this much waits to be written to the other
_CONNECT_TIMEOUT = 2.0  # the target is on loopback: it answers or refuses at once
_CONTROL_TIMEOUT = 10.0


def _abort(sock: socket.socket) -> None:
    """Close with RST rather than FIN: the other end sees a reset connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Pipe:
    """One direction of a connection: bytes read from ``source`` wait here for ``sink``."""

    def __init__(self, connection: _Connection, source: socket.socket, sink: socket.socket) -> None:
        self.connection = connection
        self.source = source
        self.sink = sink
        self.pending: deque[tuple[float, bytes]] = deque()  # (release time, bytes), in order
        self.size = 0
        self.eof = False  # the source closed its sending side
        self.done = False  # ... and that was passed on to the sink, after the pending bytes

    def wants_read(self) -> bool:
        return not self.eof and self.size < _BUFFER_LIMIT

    def ready_at(self) -> float | None:
        return self.pending[0][0] if self.pending else None


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (client, upstream)
        self.pipes = (_Pipe(self, client, upstream), _Pipe(self, upstream, client))
        self.closed = False

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            for sock in self.sockets:
                _abort(sock)

    def finish(self) -> None:
        """Both directions ended cleanly: close without a reset."""
        if not self.closed:
            self.closed = True
            for sock in self.sockets:
                sock.close()


class FaultProxy:
    """Forward connections accepted on ``listen_host`` (port chosen by the kernel, see
    `port` and `address`) to ``target_host:target_port``, with faults on demand."""

    def __init__(self, listen_host: str, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.accepted = 0  # connections accepted, refused ones included
        self.forwarded = 0  # bytes passed on, both directions
        self._cut = False
        self._delay = 0.0
        self._stopping = False
        self._error: BaseException | None = None
        self._connections: list[_Connection] = []
        self._controls: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]]
        self._controls = queue.SimpleQueue()
        self._listener = socket.create_server((listen_host, 0), backlog=64)
        self._wake_recv, self._wake_send = socket.socketpair()
        for sock in (self._listener, self._wake_recv, self._wake_send):
            sock.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self.address = f"{listen_host}:{self.port}"
        self._thread = threading.Thread(
            target=self._run, name=f"FaultProxy {self.address}", daemon=True
        )
        self._thread.start()

    # -- controls (called from the test's thread) -----------------------------------------------

    def cut(self) -> None:
        """Reset every open connection and reset each new one right after accepting it."""

        def cut() -> None:
            self._cut = True
            self._abort_all()

        self._control(cut)

    def heal(self) -> None:
        """Forward new connections again (the ones reset by `cut` stay closed)."""

        def heal() -> None:
            self._cut = False

        self._control(heal)

    def reset(self) -> None:
        """Reset the open connections once; new connections are forwarded."""
        self._control(self._abort_all)

    def delay(self, seconds: float) -> None:
        """Hold every chunk read from now on for ``seconds`` before forwarding it."""

        def delay() -> None:
            self._delay = seconds

        self._control(delay)

    @property
    def connections(self) -> int:
        """Connections being forwarded now (a snapshot: the loop may change it at any time)."""
        return sum(not c.closed for c in list(self._connections))

    def close(self) -> None:
        """Stop the loop: every connection reset, every socket closed, the thread joined.
        Safe to call more than once. Re-raises an error the loop died of."""
        if self._thread.is_alive():

            def stop() -> None:
                self._stopping = True

            with contextlib.suppress(RuntimeError):  # the loop died: reported below
                self._control(stop)
            self._thread.join(_CONTROL_TIMEOUT)
            if self._thread.is_alive():
                raise RuntimeError(f"{self._thread.name} did not stop")
        self._wake_send.close()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"{self._thread.name} failed") from error

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _control(self, action: Callable[[], None]) -> None:
        """Run ``action`` inside the loop and wait until it ran."""
        if self._error is not None or not self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} is not running") from self._error
        done = threading.Event()
        self._controls.put((action, done))
        # BlockingIOError: the buffer is full, so a wakeup is pending anyway; other OSErrors:
        # the loop just ended, which the wait below notices.
        with contextlib.suppress(OSError):
            self._wake_send.send(b"x")
        deadline = time.monotonic() + _CONTROL_TIMEOUT
        while not done.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                break
        if not done.is_set() or self._error is not None:
            raise RuntimeError(f"{self._thread.name} did not run the control") from self._error

    # -- the loop (its own thread) ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._step()
        except BaseException as error:
            self._error = error
        finally:
            self._abort_all()
            self._listener.close()
            self._wake_recv.close()  # a control still queued fails: its caller sees the thread end

    def _step(self) -> None:
        now = time.monotonic()
        readers: dict[socket.socket, _Pipe] = {}
        writers: dict[socket.socket, _Pipe] = {}
        timeout: float | None = None
        for connection in self._connections:
            for pipe in connection.pipes:
                if pipe.wants_read():
                    readers[pipe.source] = pipe
                ready_at = pipe.ready_at()
                if ready_at is not None and ready_at <= now:
                    writers[pipe.sink] = pipe
                elif ready_at is not None:
                    timeout = ready_at - now if timeout is None else min(timeout, ready_at - now)
        readable, writable, _ = select.select(
            [self._wake_recv, self._listener, *readers], list(writers), [], timeout
        )
        if self._wake_recv in readable:
            self._run_controls()
        if self._listener in readable and not self._stopping:
            self._accept()
        for sock in readable:
            pipe = readers.get(sock)
            if pipe is not None:
                self._read(pipe)
        for sock in writable:
            self._write(writers[sock])
        for connection in self._connections:
            for pipe in connection.pipes:
                if pipe.eof and not pipe.pending and not pipe.done and not connection.closed:
                    pipe.done = True
                    with contextlib.suppress(OSError):
                        pipe.sink.shutdown(socket.SHUT_WR)
            if all(pipe.done for pipe in connection.pipes):
                connection.finish()
        self._connections = [c for c in self._connections if not c.closed]

    def _run_controls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_recv.recv(4096):
                pass
        while not self._controls.empty():
            action, done = self._controls.get_nowait()
            try:
                action()
            finally:
                done.set()

    def _abort_all(self) -> None:
        for connection in self._connections:
            connection.abort()
        self._connections = []

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        self.accepted += 1
        if self._cut:
            _abort(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT)
        except OSError:  # the target is down: so is the connection through the proxy
            _abort(client)
            return
        client.setblocking(False)
        upstream.setblocking(False)
        self._connections.append(_Connection(client, upstream))

    def _read(self, pipe: _Pipe) -> None:
        connection = pipe.connection
        if connection.closed:
            return
        try:
            data = pipe.source.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by that side: pass the reset on
            connection.abort()
            return
        if not data:
            pipe.eof = True
            return
        pipe.pending.append((time.monotonic() + self._delay, data))
        pipe.size += len(data)

    def _write(self, pipe: _Pipe) -> None:
        connection = pipe.connection
        if connection.closed:
            return
        release, data = pipe.pending[0]
        try:
            sent = pipe.sink.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            connection.abort()
            return
        self.forwarded += sent
        pipe.size -= sent
        if sent == len(data):
            pipe.pending.popleft()
        else:
            pipe.pending[0] = (release, data[sent:])
