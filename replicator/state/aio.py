"""`AsyncStateStore`: the state store for trio and asyncio code, off the event loop.

SQLite calls block (a write may wait for the disk or for another writer's lock), so each call
runs the synchronous store in a worker thread through a *runner*: `asyncio_runner`
(``asyncio.to_thread``) or `trio_runner` (``trio.to_thread.run_sync``), or any callable that
takes a function and returns an awaitable of its result. No anyio needed.

A transaction must stay on one thread (its connection belongs to it), so an async transaction
is a synchronous function run whole in one worker thread: ``await store.transact(fn)``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

from replicator.state.store import StateStore

__all__ = ["AsyncStateStore", "Runner", "asyncio_runner", "trio_runner"]

_T = TypeVar("_T")


class Runner(Protocol):
    def __call__(self, function: Callable[[], _T], /) -> Awaitable[_T]: ...


def asyncio_runner(function: Callable[[], _T]) -> Awaitable[_T]:
    return asyncio.to_thread(function)


def trio_runner(function: Callable[[], _T]) -> Awaitable[_T]:
    return trio.to_thread.run_sync(function)


class AsyncStateStore:
    """Every `StateStore` call, awaitable; ``runner`` says how to reach a worker thread."""

    def __init__(self, store: StateStore, runner: Runner = asyncio_runner) -> None:
        self.store = store
        self._run = runner

    @classmethod
    def for_trio(cls, store: StateStore) -> AsyncStateStore:
        return cls(store, trio_runner)

    @classmethod
    def for_asyncio(cls, store: StateStore) -> AsyncStateStore:
        return cls(store, asyncio_runner)

    def scope(self, name: str) -> AsyncStateStore:
        return AsyncStateStore(self.store.scope(name), self._run)

    async def get(self, key: str, default: Any = None) -> Any:
        return await self._run(functools.partial(self.store.get, key, default))

    async def set(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        await self._run(functools.partial(self.store.set, key, value, ttl=ttl))

    async def delete(self, key: str) -> bool:
        return await self._run(functools.partial(self.store.delete, key))

    async def keys(self, pattern: str = "*") -> list[str]:
        return await self._run(functools.partial(self.store.keys, pattern))

    async def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        return await self._run(functools.partial(self.store.items, prefix))

    async def transact(self, function: Callable[[StateStore], _T]) -> _T:
        """``function(store)`` inside one transaction, in one worker thread: all or nothing."""

        def run() -> _T:
            with self.store.transaction() as store:
                return function(store)

        return await self._run(run)

    async def purge_expired(self) -> int:
        return await self._run(self.store.purge_expired)

    async def metrics(self) -> dict[str, Any]:
        return await self._run(self.store.metrics)

    async def close(self) -> None:
        await self._run(self.store.close)
