"""Reading HCL into typed values: every key is read through a `Section`, which knows the file
and the dotted path, so an error always names both (``node1.hcl: replication.sync.interval:
"1x" is not a duration``), and any key left unread at the end of a block is refused as
unknown: a typo never silently falls back to a default. python-hcl2 keeps the quotes of
strings and of quoted map keys (``"node1" = 100``); they are removed here."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from replicator.errors import ConfigError

__all__ = [
    "Section",
    "as_map",
    "choice",
    "host_port",
    "optional_path",
    "parse_duration",
    "parse_size",
    "resolve_path",
    "unquote",
    "whole_number",
]

_T = TypeVar("_T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_duration(text: str) -> float:
    """Seconds in "100ms", "1s", "10m", "1h", "7d" or "2w"."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (use e.g. 100ms, 30s, 10m, 1h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str | int) -> int:
    """Bytes in 4096, "256MB", "1GiB"."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (use e.g. 4096, 64KB, 256MB, 1GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


def unquote(value: Any) -> Any:
    """Strip the quotes python-hcl2 keeps on strings, recursively."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value[1:-1]
    if isinstance(value, list):
        return [unquote(item) for item in value]
    if isinstance(value, dict):
        # python-hcl2 annotates blocks with keys such as __is_block__ and __comments__.
        return {
            unquote(key): unquote(item)
            for key, item in value.items()
            if not (key.startswith("__") and key.endswith("__"))
        }
    return value


class Section:
    """One block or map being read: typed getters, and an error for every unread key."""

    def __init__(self, file: str, path: str, data: Mapping[str, Any]) -> None:
        self.file = file
        self.path = path
        self._data = dict(data)
        self._read: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigError:
        where = f"{self.path}.{key}" if key else self.path
        return ConfigError(f"{self.file}: {where}: {message}", op="config")

    def has(self, key: str) -> bool:
        return key in self._data

    def names(self) -> list[str]:
        return list(self._data)

    def raw(self, key: str) -> Any:
        self._read.add(key)
        return self._data.get(key)

    def value(self, key: str, parse: Callable[[Any], _T], default: _T) -> _T:
        raw = self.raw(key)
        if raw is None:
            return default
        try:
            return parse(raw)
        except (TypeError, ValueError) as error:
            raise self.error(key, str(error)) from None

    def string(self, key: str, default: str = "", choices: tuple[str, ...] = ()) -> str:
        def parse(raw: Any) -> str:
            if not isinstance(raw, str):
                raise TypeError(f"expected a string, got {raw!r}")
            if choices and raw not in choices:
                raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
            return raw

        return self.value(key, parse, default)

    def optional_string(self, key: str) -> str | None:
        raw = self.raw(key)
        if raw is None:
            return None
        if not isinstance(raw, str) or not raw:
            raise self.error(key, f"expected a non-empty string, got {raw!r}")
        return raw

    def boolean(self, key: str, default: bool) -> bool:
        def parse(raw: Any) -> bool:
            if not isinstance(raw, bool):
                raise TypeError(f"expected true or false, got {raw!r}")
            return raw

        return self.value(key, parse, default)

    def integer(self, key: str, default: int, low: int = 0, high: int = 1 << 62) -> int:
        def parse(raw: Any) -> int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise TypeError(f"expected a whole number, got {raw!r}")
            if not low <= raw <= high:
                raise ValueError(f"{raw} is outside {low}..{high}")
            return raw

        return self.value(key, parse, default)

    def duration(self, key: str, default: float) -> float:
        def parse(raw: Any) -> float:
            if not isinstance(raw, str):
                raise TypeError(f'expected a duration such as "10s", got {raw!r}')
            return parse_duration(raw)

        return self.value(key, parse, default)

    def size(self, key: str, default: int) -> int:
        def parse(raw: Any) -> int:
            if isinstance(raw, bool) or not isinstance(raw, str | int):
                raise TypeError(f'expected a size such as "256MB", got {raw!r}')
            return parse_size(raw)

        return self.value(key, parse, default)

    def strings(self, key: str) -> tuple[str, ...]:
        def parse(raw: Any) -> tuple[str, ...]:
            if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
                raise TypeError(f"expected a list of strings, got {raw!r}")
            return tuple(raw)

        return self.value(key, parse, ())

    def section(self, key: str) -> Section:
        """A nested block (``key { ... }``) or map (``key = { ... }``); empty when absent."""
        raw = self.raw(key)
        if raw is None:
            return Section(self.file, f"{self.path}.{key}", {})
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], dict):
            raw = raw[0]  # a block
        if not isinstance(raw, dict):
            raise self.error(key, f"expected a block or a map, got {raw!r}")
        return Section(self.file, f"{self.path}.{key}", raw)

    def sections(self, key: str) -> list[Section]:
        raw = self.raw(key)
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
            raise self.error(key, f"expected a list of maps, got {raw!r}")
        return [Section(self.file, f"{self.path}.{key}[{n}]", item) for n, item in enumerate(raw)]

    def done(self) -> None:
        unknown = [key for key in self._data if key not in self._read]
        if unknown:
            raise self.error(unknown[0], "unknown setting")


def host_port(raw: Any) -> tuple[str, int]:
    if not isinstance(raw, str) or ":" not in raw:
        raise ValueError(f"{raw!r} is not host:port")
    host, _, port_text = raw.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{raw!r} is not host:port (port 1-65535)")
    return host, int(port_text)


def whole_number(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TypeError(f"expected a whole number, got {raw!r}")
    return raw


def choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        if raw not in choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
        return str(raw)

    return parse


def as_map(raw: Any) -> dict[str, Any]:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], dict):
        raw = raw[0]
    if not isinstance(raw, dict):
        raise TypeError(f"expected a map, got {raw!r}")
    return raw


def resolve_path(base: Path, path: str) -> str:
    """Relative paths in a config file are relative to that file."""
    return str((base / path).resolve()) if not Path(path).is_absolute() else path


def optional_path(base: Path, path: str | None) -> str | None:
    return None if path is None else resolve_path(base, path)
