"""Which backups to keep: calendar buckets (hourly, daily, weekly, monthly) or an age, and
always the newest; the rule is pure, so it is tested without files."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from replicator.config import Retention
from replicator.durability.backup_format import BackupInfo

__all__ = ["expired"]


def _hour(at: datetime) -> tuple[int, ...]:
    return (at.year, at.month, at.day, at.hour)


def _day(at: datetime) -> tuple[int, ...]:
    return (at.year, at.month, at.day)


def _week(at: datetime) -> tuple[int, ...]:
    return tuple(at.isocalendar())[:2]


def _month(at: datetime) -> tuple[int, ...]:
    return (at.year, at.month)


def expired(backups: Sequence[BackupInfo], retention: Retention, now: float) -> list[str]:
    """Pure retention rule. Buckets: like restic/borg keep-hourly/daily/weekly/monthly: for each
    bucket kind with count N>0, keep the newest backup of each of the N most recent distinct
    periods (UTC hour, day, ISO week, month) that contain a backup; a backup kept by any bucket
    is kept. With max_age: keep everything younger than max_age. ALWAYS keep the newest backup,
    whatever the rule. With no rule at all (no bucket, no max_age) nothing expires: an empty
    rule is never read as "delete everything". Returns the names to delete, oldest first."""
    buckets = (
        (retention.hourly, _hour),
        (retention.daily, _day),
        (retention.weekly, _week),
        (retention.monthly, _month),
    )
    if not backups or (retention.max_age is None and all(n <= 0 for n, _ in buckets)):
        return []
    newest_first = sorted(backups, key=lambda b: (b.created_at, b.name), reverse=True)
    keep = {newest_first[0].name}
    for count, period in buckets:
        seen: set[tuple[int, ...]] = set()
        for backup in newest_first:
            if len(seen) >= count:
                break
            key = period(datetime.fromtimestamp(backup.created_at, UTC))
            if key not in seen:
                seen.add(key)
                keep.add(backup.name)
    if retention.max_age is not None:
        keep.update(b.name for b in newest_first if now - b.created_at < retention.max_age)
    return [b.name for b in reversed(newest_first) if b.name not in keep]
