"""Human formatting for the `replicator` command: durations, sizes, times and aligned tables.

Kept apart from the commands so every command renders numbers the same way, and so the rules
("340ms", "1.2s", "3m 20s", "4.1 MiB") live in one place.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "ago",
    "block",
    "count",
    "duration",
    "local_time",
    "opt",
    "rate",
    "size",
    "table",
    "yes_no",
]

NONE = "-"  # shown where a value is unknown or absent, so columns stay aligned


def duration(seconds: float | None) -> str:
    """``340ms``, ``1.2s``, ``3m 20s``, ``2h 5m``, ``3d 4h``: precise when short, terse long."""
    if seconds is None:
        return NONE
    if seconds < 0:
        return f"-{duration(-seconds)}"
    if seconds < 0.9995:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    if seconds < 59.5:
        return f"{seconds:.0f}s"
    whole = round(seconds)
    for unit, size_, smaller, smaller_size in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "m", 60),
        ("m", 60, "s", 1),
    ):
        if whole >= size_:
            major, rest = divmod(whole, size_)
            minor = rest // smaller_size
            return f"{major}{unit} {minor}{smaller}" if minor else f"{major}{unit}"
    return f"{whole}s"  # pragma: no cover - unreachable: 59.5 s and more round to 60


def size(n_bytes: float | None) -> str:
    """``512 B``, ``4.1 KiB``, ``4.1 MiB``: binary units, as ``ls -h`` and SQLite pages use."""
    if n_bytes is None:
        return NONE
    value = float(n_bytes)
    if abs(value) < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def rate(per_second: float | None, unit: str = "/s") -> str:
    if per_second is None:
        return NONE
    if per_second == 0 or per_second >= 10:
        return f"{per_second:.0f}{unit}"
    return f"{per_second:.1f}{unit}"


def count(n: int | None) -> str:
    """Thousands separated: 1,234,567 changes read at a glance."""
    return NONE if n is None else f"{n:,}"


def local_time(epoch: float | None) -> str:
    """A Unix time as the operator's local time, to the second."""
    if epoch is None:
        return NONE
    return datetime.datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def ago(seconds: float | None) -> str:
    return NONE if seconds is None else f"{duration(seconds)} ago"


def yes_no(value: object) -> str:
    return "yes" if value else "no"


def opt(value: object) -> str:
    """A value, or the placeholder when it is absent or empty."""
    return NONE if value is None or value == "" else str(value)


def table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Iterable[int] = ()
) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; ``right`` columns (numbers)
    aligned right. Trailing spaces are stripped so output diffs cleanly."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    right_aligned = set(right)

    def line(row: Sequence[str]) -> str:
        padded = (
            cell.rjust(widths[i]) if i in right_aligned else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        )
        return "  ".join(padded).rstrip()

    return [line(list(headers)), *(line(row) for row in cells)]


def block(pairs: Mapping[str, object] | Sequence[tuple[str, object]], indent: int = 2) -> list[str]:
    """``label  value`` lines with the values aligned, for a section of facts."""
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    width = max((len(label) for label, _ in items), default=0)
    pad = " " * indent
    return [f"{pad}{label.ljust(width)}  {value}".rstrip() for label, value in items]
