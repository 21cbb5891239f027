"""`backup create|list|restore`."""

from __future__ import annotations

import urllib.parse

import click

from replicator.cli import render as fmt
from replicator.cli.app import (
    LONG_REQUEST_TIMEOUT,
    Json,
    _Ordered,
    main,
)
from replicator.cli.target import (
    Target,
    node_options,
)


@main.group(cls=_Ordered)
def backup() -> None:
    """Backups of the state database: create, list, restore."""


@backup.command("create")
@click.option("--description", metavar="TEXT", help="Why this backup (shown by `backup list`).")
@node_options
def backup_create(target: Target, description: str | None) -> None:
    """Back up the state database now."""
    body = {} if description is None else {"description": description}
    answer = target.post("/api/state/backups", body, timeout=LONG_REQUEST_TIMEOUT)
    target.show(
        answer,
        lambda a: [f"Backup {a.get('name', '?')} created ({fmt.size(a.get('size_bytes'))})."],
    )


@backup.command("list")
@node_options
def backup_list(target: Target) -> None:
    """The backups the node keeps, newest first."""
    answer = target.get("/api/state/backups")

    def render(answer: Json) -> list[str]:
        if not answer.get("enabled", True):
            return ["Backups are disabled (state.backup.enabled = false)."]
        found = answer.get("backups", [])
        if not found:
            return ["No backups yet."]
        rows = [
            (
                b.get("name", fmt.NONE),
                fmt.local_time(b.get("created_at")),
                fmt.size(b.get("size_bytes")),
                fmt.opt(b.get("description")),
            )
            for b in found
        ]
        return fmt.table(["NAME", "CREATED", "SIZE", "DESCRIPTION"], rows, right={2})

    target.show(answer, render)


@backup.command("restore")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@node_options
def backup_restore(target: Target, name: str, yes: bool) -> None:
    """Replace the state database with a backup (asks first, unless --yes)."""
    if not yes:
        click.confirm(
            f"Replace this node's state with backup {name}? Changes since then are lost here "
            "(peers resend what they still hold)",
            abort=True,
        )
    answer = target.post(
        f"/api/state/backups/{urllib.parse.quote(name, safe='')}/restore",
        timeout=LONG_REQUEST_TIMEOUT,
    )
    target.show(
        answer,
        lambda a: [
            f"Backup {name} restored in {fmt.duration(a.get('seconds'))}: this node now writes "
            f"as {a.get('origin')} and catches up from its peers."
        ],
    )
