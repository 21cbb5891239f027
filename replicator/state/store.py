"""`StateStore`: a replicated key-value store in the application's own SQLite file.

It writes plain SQL into one table (`replicator.state.schema`), so the capture triggers a node
installed record every change like any application write, and the node replicates it. Nothing
here talks to the node.

Connections come from a small pool (``check_same_thread=False``, one borrower at a time), so a
store can be shared by threads and by the worker threads of the async wrapper. A transaction
keeps its connection for its thread: every call that thread makes on the store, or on any of
its scopes, joins it; calls from other threads wait for SQLite's write lock as usual.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from replicator.state import counters, expiry, schema
from replicator.state.errors import (
    ReadOnlyReplicaError,
    StateStoreClosed,
    StateStoreError,
    StateValueError,
)

__all__ = ["DEFAULT_SCOPE", "StateStore"]

DEFAULT_SCOPE = "default"
_MAX_IDLE = 4
_REFUSED_ON_REPLICA = "read-only on this replica node"
_UPSERT = (
    f"INSERT INTO {schema.TABLE} (scope, key, value, expires_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value,"
    " expires_at = excluded.expires_at"
)
_LIVE = "(expires_at IS NULL OR expires_at > ?)"


@dataclass(frozen=True, slots=True)
class Entry:
    """One write: an encoded value (None: a delete) and its expiry in unix ms (None: never)."""

    scope: str
    key: str
    packed: bytes | None
    expires_at: int | None


def encode(key: str, value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise StateValueError(
            f"the value of {key!r} cannot be stored ({error}): use msgpack-serialisable data "
            "(None, bool, int up to 64 bits, float, str, bytes, lists, tuples, dicts)"
        ) from None
    return packed


def decode(key: str, packed: bytes) -> Any:
    try:
        return msgpack.unpackb(packed, raw=False, strict_map_key=False)
    except (TypeError, ValueError) as error:
        raise StateStoreError(f"the stored value of {key!r} is not msgpack: {error}") from None


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key or "\x00" in key:
        raise ValueError(f"a key is a non-empty string without NUL characters, not {key!r}")
    return key


def _check_scope(name: object) -> str:
    if (
        not isinstance(name, str)
        or not name
        or "\x00" in name
        or "/" in name
        or name.startswith(schema.RESERVED_PREFIX)
    ):
        raise ValueError(
            f"a scope name is a non-empty string without '/' or NUL, not starting with "
            f"{schema.RESERVED_PREFIX!r}; not {name!r}"
        )
    return name


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """sqlite3 errors as the store's own (a replica's refusal named as such)."""
    try:
        yield
    except sqlite3.Error as error:
        if _REFUSED_ON_REPLICA in str(error):
            raise ReadOnlyReplicaError(
                f"cannot {what}: this node is a replica; write on the primary, or promote "
                "this node (replicator promote)"
            ) from None
        raise StateStoreError(f"cannot {what}: {error}") from error


class _Backend:
    """What every view of one store shares: the file, the connection pool, the transaction
    each thread has open, the counters."""

    def __init__(
        self,
        path: str,
        busy_timeout: float,
        clock: Callable[[], float],
        purge_margin: float,
        metrics_interval: float,
    ) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.clock = clock
        self.purge_margin_ms = int(purge_margin * 1000)
        self.metrics_interval = metrics_interval
        self.counters = counters.Counters()
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        self._published_at = time.monotonic()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- connections -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        new_file = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout
        )
        if new_file:  # a file nobody chose a journal for yet: WAL lets readers and writers be
            conn.execute("PRAGMA journal_mode = WAL")
        return conn

    def _take(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise StateStoreClosed(f"the state store on {self.path} is closed")
            if self._idle:
                return self._idle.pop()
        with _translated(f"open {self.path}"):
            return self._open()

    def _give(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:  # never hand on a connection in the middle of something
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:  # a connection that cannot even roll back is not reused
                conn.close()
                return
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    @contextlib.contextmanager
    def connection(self, what: str) -> Iterator[sqlite3.Connection]:
        """This thread's transaction connection if one is open, else one from the pool;
        sqlite3 errors inside become the store's own."""
        with _translated(what), self.borrow() as conn:
            yield conn

    @contextlib.contextmanager
    def borrow(self) -> Iterator[sqlite3.Connection]:
        held: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        conn = self._take()
        try:
            yield conn
        finally:
            self._give(conn)

    @contextlib.contextmanager
    def transaction(self, what: str = "run a transaction") -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (the write lock from the start, so reads inside see what the
        writes will replace); nested blocks are savepoints, rolled back alone.

        Not `capture.transactions.write_transaction`: what did not commit is rolled back when
        the connection goes back to the pool (`_give`), which drops a connection that cannot
        even roll back instead of raising."""
        held: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if held is not None:
            depth = self._local.depth = self._local.depth + 1
            name = f"state_store_{depth}"
            with _translated(what):
                held.execute(f"SAVEPOINT {name}")
                try:
                    yield held
                except BaseException:
                    if held.in_transaction:  # (an I/O error may have rolled back it all)
                        held.execute(f"ROLLBACK TO {name}")
                        held.execute(f"RELEASE {name}")
                    raise
                else:
                    held.execute(f"RELEASE {name}")
                finally:
                    self._local.depth = depth - 1
            return
        conn = self._take()
        try:
            with _translated(what):
                conn.execute("BEGIN IMMEDIATE")
                self._local.conn, self._local.depth = conn, 0
                try:
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    self._local.conn = None
        finally:
            self._give(conn)  # rolls back whatever did not commit

    @property
    def in_transaction(self) -> bool:
        return getattr(self._local, "conn", None) is not None

    # -- writing -----------------------------------------------------------------------------

    def write(self, entries: Sequence[Entry]) -> None:
        """Entries in order, in one transaction (or the caller's)."""
        with self.transaction("write") as conn:
            for entry in entries:
                if entry.packed is None:
                    conn.execute(
                        f"DELETE FROM {schema.TABLE} WHERE scope = ? AND key = ?",
                        (entry.scope, entry.key),
                    )
                else:
                    conn.execute(_UPSERT, (entry.scope, entry.key, entry.packed, entry.expires_at))
        deletes = sum(1 for entry in entries if entry.packed is None)
        self.count(writes=len(entries) - deletes, deletes=deletes)

    # -- metrics -----------------------------------------------------------------------------

    def count(self, **counts: int) -> None:
        self.counters.add(**counts)
        due = time.monotonic() - self._published_at >= self.metrics_interval
        if due and not self.in_transaction:
            self.publish(closing=False)

    def publish(self, *, closing: bool) -> None:
        """Copy the counters where the node reads them. Best effort: metrics never fail a
        read or a write, and a file no node prepared has nowhere to put them."""
        self._published_at = time.monotonic()
        try:
            with self.connection("publish metrics") as conn:
                if not counters.has_table(conn):
                    return
                if closing:
                    counters.fold(conn, self.instance, self.counters, time.time())
                else:
                    counters.publish(conn, self.instance, os.getpid(), self.counters, time.time())
        except StateStoreError:
            return

    def close(self) -> None:
        if self._closed:
            return
        self.publish(closing=True)
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class StateStore:
    """A replicated key-value store: ``get``, ``set``, ``delete``, ``keys``, ``items`` in one
    scope, ``scope(name)`` for an isolated view, ``transaction()`` for all-or-nothing work.

    ``path`` is the state file a node replicates (``state.path``). The table is created if
    missing, but it replicates only when the node lists ``state_kv = true`` in
    ``replication.data`` (see `replicated`). Values are any msgpack-serialisable data (tuples
    come back as lists). ``ttl`` (seconds) makes a key expire: its expiry replicates with the
    value, reads hide it once past, and `purge_expired` reclaims it locally. ``clock`` (unix
    seconds) is injectable for tests; ``purge_margin`` is how long past its expiry a key stays
    before a purge may remove it: at least the clock skew nodes tolerate (their
    ``max_clock_offset``), so no node purges a key another still reads as live.
    """

    _backend: _Backend
    _scope: str
    _children: str  # what the names of this view's scopes start with

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        scope: str = DEFAULT_SCOPE,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
        purge_margin: float = 60.0,
        metrics_interval: float = 10.0,
    ) -> None:
        if purge_margin < 0 or metrics_interval < 0 or busy_timeout < 0:
            raise ValueError("purge_margin, metrics_interval and busy_timeout are not negative")
        self._scope = _check_scope(scope)
        self._children = "" if scope == DEFAULT_SCOPE else f"{scope}/"
        self._backend = _Backend(
            os.fspath(path), busy_timeout, clock, purge_margin, metrics_interval
        )
        try:
            with self._backend.connection(f"open the state store in {path}") as conn:
                schema.ensure_table(conn)
        except BaseException:
            self._backend.close()
            raise

    @classmethod
    def _view(cls, backend: _Backend, scope: str) -> StateStore:
        view = cls.__new__(cls)
        view._backend, view._scope, view._children = backend, scope, f"{scope}/"
        return view

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self._backend.path

    @property
    def scope_name(self) -> str:
        return self._scope

    def now_ms(self) -> int:
        """The store's clock in unix milliseconds: what expiry is measured against."""
        return self._backend.now_ms()

    @property
    def replicated(self) -> bool:
        """Whether a node captures the table here (else writes stay in this file)."""
        with self._backend.connection("inspect the state table") as conn:
            return schema.is_replicated(conn)

    def scope(self, name: str) -> StateStore:
        """A view of the scope ``name``, which sees only its own keys. From the store opened
        on the default scope, ``name`` is a top-level scope; from any other scope, a scope
        nested in it (``tenant/name``), so a tenant's view only ever reaches its own."""
        return self._view(self._backend, self._children + _check_scope(name))

    # -- reading -----------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it is absent or expired."""
        check_key(key)
        with self._backend.connection(f"read {key!r}") as conn:
            row = conn.execute(
                f"SELECT value FROM {schema.TABLE} WHERE scope = ? AND key = ? AND {_LIVE}",
                (self._scope, key, self._backend.now_ms()),
            ).fetchone()
        self._backend.count(reads=1, hits=row is not None, misses=row is None)
        return default if row is None else decode(key, row[0])

    def keys(self, pattern: str = "*") -> list[str]:
        """Live keys matching a glob pattern (SQLite GLOB: ``*``, ``?``, ``[a-z]``, ``[^a]``;
        case-sensitive), sorted."""
        if not isinstance(pattern, str):
            raise TypeError(f"a pattern is a string, not {pattern!r}")
        with self._backend.connection("list keys") as conn:
            rows = conn.execute(
                f"SELECT key FROM {schema.TABLE} WHERE scope = ? AND key GLOB ? AND {_LIVE}"
                " ORDER BY key",
                (self._scope, pattern, self._backend.now_ms()),
            ).fetchall()
        self._backend.count(reads=1)
        return [key for (key,) in rows]

    def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        """Live ``(key, value)`` pairs whose key starts with ``prefix``, sorted by key."""
        if not isinstance(prefix, str):
            raise TypeError(f"a prefix is a string, not {prefix!r}")
        with self._backend.connection("list items") as conn:
            rows = conn.execute(
                f"SELECT key, value FROM {schema.TABLE} WHERE scope = ? AND key GLOB ?"
                f" AND {_LIVE} ORDER BY key",
                (self._scope, _glob_literal(prefix) + "*", self._backend.now_ms()),
            ).fetchall()
        self._backend.count(reads=1)
        return [(key, decode(key, packed)) for key, packed in rows]

    # -- writing -----------------------------------------------------------------------------

    def set(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``; with ``ttl``, it expires that many seconds from now."""
        self._backend.write([self.entry(key, value, ttl)])

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it held a live value."""
        check_key(key)
        with (
            self._backend.connection(f"delete {key!r}") as conn,
            contextlib.closing(
                conn.execute(
                    f"DELETE FROM {schema.TABLE} WHERE scope = ? AND key = ? RETURNING expires_at",
                    (self._scope, key),
                )
            ) as cursor,
        ):
            removed = cursor.fetchall()
        self._backend.count(deletes=1)
        return bool(removed) and (removed[0][0] is None or removed[0][0] > self._backend.now_ms())

    def entry(self, key: str, value: Any, ttl: float | None = None) -> Entry:
        """``set``'s write, encoded now (what write-behind keeps until it flushes)."""
        check_key(key)
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl is a number of seconds above 0, not {ttl!r}")
        expires_at = None if ttl is None else int((self._backend.clock() + ttl) * 1000)
        return Entry(self._scope, key, encode(key, value), expires_at)

    def deletion(self, key: str) -> Entry:
        return Entry(self._scope, check_key(key), None, None)

    def write(self, entries: Sequence[Entry]) -> None:
        """Several writes (`entry`, `deletion`) in one transaction, in order."""
        self._backend.write(entries)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StateStore]:
        """All or nothing: every call this thread makes on the store (any scope) inside the
        block commits together at its end, or not at all if it raises. Nested blocks roll
        back alone."""
        with self._backend.transaction():
            yield self

    def purge_expired(self) -> int:
        """Remove keys (of every scope) that expired more than ``purge_margin`` ago, on this
        node only; returns how many. Never replicated, never beats a newer ``set`` made
        elsewhere (see `replicator.state.expiry`). Call it now and then (e.g. every minute)."""
        backend = self._backend
        with backend.transaction("purge expired keys") as conn:
            return expiry.purge(conn, backend.now_ms(), backend.purge_margin_ms)

    # -- the rest ----------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """This store instance's reads, writes, deletes, hits, misses and hit ratio (all its
        scopes), and the live keys and value bytes in the whole table."""
        with self._backend.connection("count keys") as conn:
            keys, size = counters.stored(conn, self._backend.now_ms())
        return counters.figures(self._backend.counters.values(), keys, size)

    def publish_metrics(self) -> None:
        """Copy the counters to where the node's /metrics reads them now (this also happens
        every ``metrics_interval`` while the store is used, and at close)."""
        self._backend.publish(closing=False)

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection to the same file for the application's own SQL (autocommit mode; it
        is this thread's transaction connection inside `transaction`)."""
        with self._backend.borrow() as conn:
            yield conn

    def close(self) -> None:
        """Publish the counters and close the connections (every scope view shares them)."""
        self._backend.close()


def _glob_literal(text: str) -> str:
    """``text`` as a GLOB pattern matching itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)
