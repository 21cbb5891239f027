"""`conflicts list|show|resolve`: the manual queue."""

from __future__ import annotations

import urllib.parse

import click

from replicator.capture import hlc
from replicator.cli import render as fmt
from replicator.cli.app import (
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
def conflicts() -> None:
    """Conflicts queued for review: list, show, resolve."""


@conflicts.command("list")
@click.option(
    "--status",
    "wanted",
    type=click.Choice(["open", "resolved", "timed_out", "all"]),
    default="open",
    show_default=True,
    help="Which conflicts to list.",
)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="At most this many, newest first.")  # fmt: skip
@node_options
def conflicts_list(target: Target, wanted: str, limit: int) -> None:
    """List queued conflicts, newest first.

    Each with its id, table, key, strategy, provisional winner and status.
    """
    query = urllib.parse.urlencode({"status": wanted, "limit": limit})
    answer = target.get(f"/api/replication/conflicts?{query}")

    def render(answer: Json) -> list[str]:
        found = answer["conflicts"]
        label = "" if wanted == "all" else f"{wanted.replace('_', ' ')} "
        if not found:
            return [f"No {label}conflicts."]
        rows = [
            (
                c["id"],
                c["table"],
                c["key"],
                c["strategy"],
                c["winner"],
                c["status"],
                _ms_time(c["detected_at_ms"]),
                c["reason"],
            )
            for c in found
        ]
        headers = ["ID", "TABLE", "KEY", "STRATEGY", "WINNER", "STATUS", "DETECTED", "REASON"]
        lines = fmt.table(headers, rows)
        lines += ["", f"{len(found)} {label}conflict{'s' if len(found) != 1 else ''}."]
        if any(c["status"] == "open" for c in found):
            lines.append("Inspect: replicator conflicts show ID; "
                         "decide: replicator conflicts resolve ID --use local|remote")  # fmt: skip
        return lines

    target.show(answer, render)


def _ms_time(ms: int | None) -> str:
    return fmt.NONE if ms is None else fmt.local_time(ms / 1000)


def _conflict_path(ident: str) -> str:
    return f"/api/replication/conflicts/{urllib.parse.quote(ident, safe='')}"


@conflicts.command("show")
@click.argument("ident", metavar="ID")
@node_options
def conflicts_show(target: Target, ident: str) -> None:
    """One conflict: both versions and rows side by side."""
    answer = target.get(_conflict_path(ident))
    target.show(answer, _conflict_lines)


def _version_text(version: Json) -> str:
    stamp = int(version["hlc"])
    physical = hlc.physical_ms(stamp)
    when = f"{fmt.local_time(physical / 1000)}.{physical % 1000:03d}"
    return f"{when} by {version['origin']} (generation {version['generation']})"


def _conflict_lines(c: Json) -> list[str]:
    winner = c["winner"]
    held = (
        "provisional: the row every node holds now"
        if c["status"] == "open"
        else "the strategy's pick; see resolution"
    )
    lines = [f"Conflict {c['id']} ({c['status']})"]
    lines += fmt.block(
        [
            ("table", c["table"]),
            ("key", c["key"]),
            ("strategy", c["strategy"]),
            ("reason", c["reason"]),
            ("detected", _ms_time(c["detected_at_ms"])),
            ("closed", _ms_time(c["closed_at_ms"])),
            ("resolution", fmt.opt(c["resolution"])),
            ("winner", f"{winner} ({held})"),
            ("local version", _version_text(c["local_version"])),
            ("remote version", _version_text(c["remote_version"])),
        ]
    )
    local, remote = c["local_row"], c["remote_row"]
    columns = list(dict.fromkeys([*(local or {}), *(remote or {})]))
    rows = []
    for column in columns:
        mine, theirs = (_cell(row, column) for row in (local, remote))
        rows.append((column, mine, theirs, "*" if mine != theirs else ""))
    if not columns:
        rows.append(("(row)", "(deleted)", "(deleted)", ""))
    lines += ["", *_indent(fmt.table(["COLUMN", "LOCAL", "REMOTE", "DIFFERS"], rows))]
    if c["status"] == "open":
        lines += ["", f"Decide: replicator conflicts resolve {c['id']} --use local|remote"]
    return lines


def _cell(row: Json | None, column: str) -> str:
    """A column of a conflict's row as SQL shows it: NULL, or the row is gone."""
    if row is None:
        return "(deleted)"
    value = row.get(column)
    return "NULL" if value is None else str(value)


@conflicts.command("resolve")
@click.argument("ident", metavar="ID")
@click.option(
    "--use",
    type=click.Choice(["local", "remote"]),
    required=True,
    help="Keep this node's row (local) or the peer's (remote).",
)
@node_options
def conflicts_resolve(target: Target, ident: str, use: str) -> None:
    """Close an open conflict by keeping one side's row.

    The choice is written as a new change that outranks both versions: it replicates like
    any write and closes the conflict on every node.
    """
    answer = target.post(f"{_conflict_path(ident)}/resolve", {"use": use})

    def render(answer: Json) -> list[str]:
        return [
            f"Conflict {answer['id']} {answer['status']}: kept the {use} row "
            f"of {answer['table']} {answer['key']}.",
            "The resolution replicates to every node and closes the conflict there too.",
        ]

    target.show(answer, render)
