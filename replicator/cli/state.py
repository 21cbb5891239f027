"""`state status|stats|validate|compact`: the state file."""

from __future__ import annotations

import click

from replicator.cli import render as fmt
from replicator.cli.app import (
    EXIT_PROBLEM,
    LONG_REQUEST_TIMEOUT,
    Json,
    _Ordered,
    main,
)
from replicator.cli.target import (
    Target,
    _indent,
    node_options,
)


@main.group(cls=_Ordered)
def state() -> None:
    """The state database: status, stats, validate, compact."""


@state.command("status")
@node_options
def state_status(target: Target) -> None:
    """The state file: size, journal, schema, last validation."""
    answer = target.get("/api/state/status")

    def render(answer: Json) -> list[str]:
        validation = answer.get("last_validation")
        if validation is None:
            validated = "never (replicator state validate)"
        else:
            validated = (
                f"{'ok' if validation['ok'] else 'PROBLEMS'} at "
                f"{fmt.local_time(validation['checked_at'])}"
            )
        backups = answer.get("backups", {})
        if backups.get("enabled"):
            every = fmt.duration(backups.get("interval_seconds"))
            backed = f"every {every} into {backups.get('directory')}"
            if backups.get("last_error"):
                backed += f" (LAST FAILED: {backups['last_error']})"
        else:
            backed = "disabled (state.backup)"
        degraded = answer.get("degraded")
        lines = [f"State database {answer['path']}"]
        lines += fmt.block(
            [
                ("size", f"{fmt.size(answer['size_bytes'])} "
                         f"(+ {fmt.size(answer['wal_bytes'])} WAL)"),
                ("journal mode", answer["journal_mode"]),
                ("synchronous", answer["synchronous"]),
                ("schema version", answer["replicator_schema_version"]),
                ("last validation", validated),
                ("backups", backed),
                ("writes", "ok" if not degraded else
                           f"REFUSED since {fmt.local_time(degraded['since'])}: "
                           f"{degraded['error']} (replication paused)"),
            ]
        )  # fmt: skip
        if answer.get("restoring"):
            lines += ["", f"Restoring backup {answer['restoring']} now: replication paused."]
        restore = answer.get("last_restore")
        if restore:
            took = fmt.duration(restore["seconds"])
            lines += ["", f"Last restore: backup {restore['backup']} at "
                          f"{fmt.local_time(restore['restored_at'])} "
                          f"(took {took}, origin {restore['origin']})"]  # fmt: skip
        recovery = answer.get("recovery")
        if recovery:
            lines += ["", "Recovery at start", *_indent([
                f"problem  {recovery['problem']}",
                f"outcome  {recovery['outcome']}",
            ])]  # fmt: skip
            for step in recovery.get("steps", []):
                details = ", ".join(f"{k}={v}" for k, v in step.items() if k not in ("at", "step"))
                text = f"{fmt.local_time(step['at'])}  {step['step']}"
                lines += _indent([f"{text} ({details})" if details else text])
        return lines

    target.show(answer, render)


@state.command("stats")
@node_options
def state_stats(target: Target) -> None:
    """Rows and tombstones per table, log, pages, queues."""
    answer = target.get("/api/state/stats")

    def render(answer: Json) -> list[str]:
        pages, free = answer["pages"], answer["free_pages"]
        lines = [f"State database {answer['path']}"]
        lines += fmt.block(
            [
                ("size", f"{fmt.size(answer['size_bytes'])} "
                         f"(+ {fmt.size(answer['wal_bytes'])} WAL)"),
                ("pages", f"{fmt.count(pages)} of {fmt.size(answer['page_size'])}, "
                          f"{fmt.count(free)} free"
                          f" ({100 * free / pages if pages else 0:.0f}%)"),
                ("log entries", fmt.count(answer["log_entries"])),
                ("conflicts open", answer["conflicts_open"]),
                ("quarantined", f"{answer['quarantined']} changes"),
                ("backups", _backup_summary(answer.get("backups", {}))),
            ]
        )  # fmt: skip
        rows = [
            (name, fmt.count(t["rows"]), fmt.count(t["tombstones"]))
            for name, t in answer["tables"].items()
        ]
        lines += ["", *_indent(fmt.table(["TABLE", "ROWS", "TOMBSTONES"], rows, right={1, 2}))]
        return lines

    target.show(answer, render)


def _backup_summary(backups: Json) -> str:
    if not backups.get("enabled"):
        return "disabled"
    last = backups.get("last")
    if not last:
        return "none yet"
    return (f"{backups['count']} ({fmt.size(backups.get('bytes'))}), newest {last['name']} "
            f"at {fmt.local_time(last['created_at'])}")  # fmt: skip


@state.command("validate")
@node_options
def state_validate(target: Target) -> None:
    """Check integrity and invariants; exit 1 on a problem.

    Runs PRAGMA integrity_check and checks replicator's own invariants (capture triggers,
    log and version vector).
    """
    answer = target.post("/api/state/validate")

    def render(answer: Json) -> list[str]:
        took = fmt.duration(answer["seconds"])
        if answer["ok"]:
            return [f"State database OK: integrity_check ok, invariants hold (took {took})."]
        lines = [click.style(f"PROBLEMS ({len(answer['problems'])})", fg="red", bold=True)]
        lines += [f"  ! {problem}" for problem in answer["problems"]]
        lines.append(f"integrity_check: {answer['integrity_check']} (took {took})")
        return lines

    target.show(answer, render)
    if not answer["ok"]:
        raise click.exceptions.Exit(EXIT_PROBLEM)


@state.command("compact")
@node_options
def state_compact(target: Target) -> None:
    """Drop log entries every peer holds, then VACUUM.

    VACUUM rewrites the whole file: on a large one this takes a while.
    """
    if not target.as_json:
        click.echo("Compacting (VACUUM rewrites the whole file)...", err=True)
    answer = target.post("/api/state/compact", timeout=LONG_REQUEST_TIMEOUT)

    def render(answer: Json) -> list[str]:
        return [
            f"Compacted: {fmt.size(answer['bytes_before'])} -> {fmt.size(answer['bytes_after'])}"
            f", {fmt.count(answer['log_entries_removed'])} log entries removed."
        ]

    target.show(answer, render)
