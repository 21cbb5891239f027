"""Conflict strategies: each is a total order on row versions (design section 4).

A node keeps whichever of its current version and an incoming one ranks higher. Keeping the
maximum of a total order gives the same result whatever order changes arrive in, so every node
converges on the same winner; and each order ranks a version above the one it replaced, so a
write made with knowledge of another always beats it. Plugins supply an order key too, and keep
that guarantee as long as their key is a total order that honours causality.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from protocol import RowVersion
from replicator.capture import hlc
from replicator.errors import ConfigError

__all__ = [
    "ManualResolver",
    "PriorityResolver",
    "Resolver",
    "TimestampResolver",
    "load_plugin",
    "make_resolver",
]


@runtime_checkable
class Resolver(Protocol):
    """What a strategy supplies: an order key on versions, and whether to queue for review."""

    @property
    def name(self) -> str:
        """The strategy's name, as counted and shown to operators."""

    def order_key(self, version: RowVersion) -> tuple[Any, ...]:
        """Greater key wins. Must be a total order: no two distinct versions may tie."""

    def review_reason(self, local: RowVersion, remote: RowVersion) -> str | None:
        """A reason to queue this conflict for an operator, or None to just count it."""


def _origin_key(version: RowVersion) -> tuple[str, int]:
    return version.origin.node_id, version.origin.incarnation


@dataclass(frozen=True, slots=True)
class TimestampResolver:
    """Newest write wins, by (hlc, origin). Near-ties inside the skew tolerance are counted,
    and queued for review with ``near_tie = "manual"``; the stored winner stays the maximum."""

    clock_skew_tolerance_ms: int = 100
    near_tie: str = "count"
    name: str = "timestamp"

    def order_key(self, version: RowVersion) -> tuple[Any, ...]:
        return (version.hlc, *_origin_key(version))

    def is_near_tie(self, local: RowVersion, remote: RowVersion) -> bool:
        apart = abs(hlc.physical_ms(local.hlc) - hlc.physical_ms(remote.hlc))
        return apart <= self.clock_skew_tolerance_ms

    def review_reason(self, local: RowVersion, remote: RowVersion) -> str | None:
        if self.near_tie == "manual" and self.is_near_tie(local, remote):
            return "near_tie"
        return None


@dataclass(frozen=True, slots=True)
class PriorityResolver:
    """Among concurrent writes of the same generation the higher-priority node wins; a causal
    successor (higher generation) always wins, so a low-priority node can still update a row."""

    priorities: Mapping[str, int] = field(default_factory=dict)
    name: str = "priority"

    def order_key(self, version: RowVersion) -> tuple[Any, ...]:
        priority = self.priorities.get(version.origin.node_id, 0)
        return (version.generation, priority, version.hlc, *_origin_key(version))

    def review_reason(self, local: RowVersion, remote: RowVersion) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class ManualResolver:
    """The timestamp order picks a provisional winner (the same on every node); every conflict
    is queued for an operator, whose resolution is a new write that ranks above both."""

    name: str = "manual"

    def order_key(self, version: RowVersion) -> tuple[Any, ...]:
        return (version.hlc, *_origin_key(version))

    def review_reason(self, local: RowVersion, remote: RowVersion) -> str | None:
        return "manual"


def load_plugin(path: str, options: Mapping[str, Any] | None = None) -> Resolver:
    """Instantiate a resolver class named by a dotted path (``package.module.Class`` or
    ``package.module:Class``)."""
    module_name, _, class_name = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise ConfigError(
            f"conflict resolver plugin {path!r} is not a dotted path to a class",
            op="load_plugin",
            hint="write it as package.module.ClassName",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"cannot import module {module_name!r} of conflict resolver plugin {path!r}: {error}",
            op="load_plugin",
        ) from error
    factory = getattr(module, class_name, None)
    if factory is None:
        raise ConfigError(
            f"module {module_name!r} has no {class_name!r} for conflict resolver plugin",
            op="load_plugin",
        )
    resolver = factory(**dict(options or {}))
    if not isinstance(resolver, Resolver):
        raise ConfigError(
            f"conflict resolver plugin {path!r} does not provide name, order_key and review_reason",
            op="load_plugin",
        )
    return resolver


def make_resolver(
    strategy: str,
    *,
    clock_skew_tolerance_ms: int = 100,
    near_tie: str = "count",
    priorities: Mapping[str, int] | None = None,
    plugin_options: Mapping[str, Any] | None = None,
) -> Resolver:
    if strategy == "timestamp":
        return TimestampResolver(clock_skew_tolerance_ms, near_tie)
    if strategy == "priority":
        return PriorityResolver(dict(priorities or {}))
    if strategy == "manual":
        return ManualResolver()
    if "." in strategy or ":" in strategy:
        return load_plugin(strategy, plugin_options)
    raise ConfigError(
        f"unknown conflict strategy {strategy!r}",
        op="make_resolver",
        hint="use timestamp, priority, manual, or a dotted path to a plugin class",
    )
