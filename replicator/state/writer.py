"""Write-behind for the state store: rapid updates coalesced, written in batches.

An application that rewrites the same keys many times a second (counters, last-seen times)
need not commit each one: `BatchedWriter` keeps the newest write per key in memory and writes
them all in one transaction every ``interval`` seconds, on `flush`, and on `close` (and at
interpreter exit). Memory is bounded: at most ``max_pending`` distinct keys wait, counting a
batch being written. A write of a new key beyond that bound is written through by the caller
itself (it flushes, blocking, so the caller is slowed to the disk's pace instead of memory
growing); while the database keeps refusing, the caller retries for ``full_timeout`` seconds,
then gets `WriteBehindFull` and that one write is not taken (nothing taken earlier is lost).

A database that refuses a batch (disk full, I/O errors, a long lock) never loses it: the batch
goes back under any newer writes of the same keys, the failure is logged, and the background
flush tries again every ``retry_interval`` seconds, without raising in the application.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Any

from replicator.state.errors import StateStoreClosed, StateStoreError, WriteBehindFull
from replicator.state.store import Entry, StateStore, decode

__all__ = ["BatchedWriter"]

_log = logging.getLogger("replicator.state")
_Ident = tuple[str, str]
_REPEAT_WARNING = 60.0  # seconds between warnings while the database keeps refusing


class BatchedWriter:
    """Write-behind over ``store`` (or one of its scopes). Use it as a context manager, or
    call `close`, so the last writes are flushed."""

    def __init__(
        self,
        store: StateStore,
        *,
        interval: float | None = 0.1,
        max_pending: int = 10_000,
        full_timeout: float = 30.0,
        retry_interval: float = 1.0,
    ) -> None:
        """``interval``: seconds between background flushes (None: only `flush` and `close`
        write)."""
        if max_pending < 1:
            raise ValueError(f"max_pending is at least 1, not {max_pending!r}")
        self._store = store
        self._interval = interval
        self._max_pending = max_pending
        self._full_timeout = full_timeout
        self._retry_interval = retry_interval
        self._pending: dict[_Ident, Entry] = {}
        self._writing: dict[_Ident, Entry] = {}
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self.failures = 0
        """Flushes the database refused so far."""
        self._thread: threading.Thread | None = None
        if interval is not None:
            self._thread = threading.Thread(
                target=self._run, name="state-store-write-behind", daemon=True
            )
            self._thread.start()
        atexit.register(self._flush_at_exit)  # until closed: pending writes are not dropped

    def __enter__(self) -> BatchedWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Keys not written yet (including a batch being written)."""
        with self._lock:
            return len(self._pending.keys() | self._writing.keys())

    # -- taking writes ---------------------------------------------------------------------

    def set(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Like `StateStore.set`, written later; the value is encoded (and checked) now, and
        ``ttl`` counts from now."""
        self._put(self._store.entry(key, value, ttl))

    def delete(self, key: str) -> None:
        """Like `StateStore.delete`, written later (and coalesced with the key's sets)."""
        self._put(self._store.deletion(key))

    def get(self, key: str, default: Any = None) -> Any:
        """The newest value of ``key``: a pending write if there is one, else the store's."""
        ident = (self._store.scope_name, key)
        with self._lock:
            entry = self._pending.get(ident) or self._writing.get(ident)
        if entry is None:
            return self._store.get(key, default)
        live = entry.expires_at is None or entry.expires_at > self._store.now_ms()
        return decode(key, entry.packed) if entry.packed is not None and live else default

    def _put(self, entry: Entry) -> None:
        ident = (entry.scope, entry.key)
        deadline: float | None = None
        while True:
            with self._lock:
                if self._closed:
                    raise StateStoreError("the write-behind writer is closed")
                held = len(self._pending.keys() | self._writing.keys())
                if ident in self._pending or held < self._max_pending:
                    self._pending[ident] = entry
                    self._wake.set()
                    return
            # Full: write through now, in the caller's thread (back-pressure).
            deadline = deadline or time.monotonic() + self._full_timeout
            try:
                self.flush()
            except StateStoreClosed:
                raise
            except StateStoreError as error:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WriteBehindFull(
                        f"{self._max_pending} keys wait to be written and the database has "
                        f"refused them for {self._full_timeout:g}s ({error})"
                    ) from error
                time.sleep(min(self._retry_interval, left))

    # -- writing ---------------------------------------------------------------------------

    def flush(self) -> int:
        """Write every pending key now, in one transaction; returns how many. On a database
        error raises `StateStoreError` and keeps them all pending."""
        with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, {}
                self._writing = batch
            if not batch:
                return 0
            try:
                self._store.write(list(batch.values()))
            except BaseException:
                with self._lock:  # back, under anything written since
                    for ident, entry in batch.items():
                        self._pending.setdefault(ident, entry)
                    self._writing = {}
                raise
            with self._lock:
                self._writing = {}
            return len(batch)

    def _run(self) -> None:
        assert self._interval is not None
        delay = self._interval
        streak, warned_at = 0, 0.0
        while True:
            self._wake.wait()
            if self._stop.wait(delay):
                return
            self._wake.clear()
            try:
                self.flush()
            except StateStoreClosed:
                _log.error("write-behind: the store was closed first; %d keys not written",
                           self.pending)  # fmt: skip
                return
            except StateStoreError as error:
                self.failures += 1
                streak += 1
                self._wake.set()
                delay = self._retry_interval
                if streak == 1 or time.monotonic() - warned_at >= _REPEAT_WARNING:
                    warned_at = time.monotonic()  # once per outage, then now and then
                    _log.warning(
                        "write-behind flush failed (%d in a row); %d keys kept, retrying "
                        "every %gs: %s",
                        streak,
                        self.pending,
                        delay,
                        error,
                    )
                continue
            if streak:
                _log.warning("write-behind flush succeeded after %d failed in a row", streak)
            delay, streak = self._interval, 0

    def close(self) -> None:
        """Stop the background flush and write what is pending, retrying for up to
        ``full_timeout`` seconds; raises `StateStoreError` (keeping the writes, see
        `pending`) if the database still refuses. The store itself stays open."""
        with self._lock:
            self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        deadline = time.monotonic() + self._full_timeout
        while True:
            try:
                self.flush()
                break
            except StateStoreClosed:
                atexit.unregister(self._flush_at_exit)  # no later try can do better
                raise
            except StateStoreError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                time.sleep(min(self._retry_interval, left))
        atexit.unregister(self._flush_at_exit)

    def _flush_at_exit(self) -> None:
        """The application exits without closing: write what waits, if the disk lets us."""
        try:
            self.close()
        except StateStoreError as error:
            _log.error("write-behind: %d keys could not be written at exit: %s",
                       self.pending, error)  # fmt: skip
