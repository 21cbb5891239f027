"""`pause`, `resume`, `resync`, `checkpoint`, `validate` and `promote`: steering replication."""

from __future__ import annotations

import sys
import time

import click

from replicator.cli import render as fmt
from replicator.cli.app import (
    EXIT_PROBLEM,
    Json,
    Problem,
    main,
)
from replicator.cli.target import (
    Target,
    _indent,
    _vector_text,
    node_options,
)


@main.command()
@node_options
def pause(target: Target) -> None:
    """Stop sending and applying changes.

    Connections and heartbeats stay up, and local writes are still captured: `resume`
    sends them.
    """
    answer = target.post("/api/replication/pause")
    target.show(
        answer,
        lambda _: [
            "Replication paused: nothing is sent or applied until `replicator resume`.",
            "Local writes are still captured in the log and sent on resume.",
        ],
    )


@main.command()
@node_options
def resume(target: Target) -> None:
    """Resume sending and applying changes after `pause`."""
    answer = target.post("/api/replication/resume")
    target.show(answer, lambda _: ["Replication resumed."])


@main.command()
@click.option("--peer", "peer_id", metavar="ID", help="Pull from this peer (default: the "
              "first connected one).")  # fmt: skip
@click.option(
    "--full",
    is_flag=True,
    help="Pull the peer's whole state as a verified snapshot, not just its log again.",
)
@click.option("--wait", is_flag=True, help="With --full: follow the snapshot until it ends.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    default=600.0,
    show_default=True,
    help="With --wait: stop waiting after this long (exit 1).",
)
@node_options
def resync(target: Target, peer_id: str | None, full: bool, wait: bool, timeout: float) -> None:
    """Pull a peer's log again, or (--full) its whole state.

    This node asks the peer (--peer, or the first connected one) to stream its log again
    from where this node stands, or to send a verified snapshot of its state. --wait
    follows a snapshot to its end and exits 1 if it fails.
    """
    if wait and not full:
        raise click.UsageError("--wait follows a snapshot: use it with --full")
    before: Json | None = None
    if wait:
        before = target.get("/api/replication/status")
    body: Json = {"full": full}
    if peer_id is not None:
        body["peer"] = peer_id
    answer = target.post("/api/replication/resync", body)
    peer = answer["peer"]
    what = "its whole state (a snapshot)" if full else "its log again"
    if not wait:
        target.show(
            answer,
            lambda _: [
                f"Resync requested: pulling {what} from {peer}.",
                "Follow it with `replicator status --verbose` (Snapshots).",
            ],
        )
        return
    assert before is not None
    if not target.as_json:
        click.echo(f"Resync requested: pulling {what} from {peer}.")
    snapshot = _follow_snapshot(target, peer, _receiving(before, peer), timeout)
    if target.as_json:
        target.dump({**answer, "snapshot": snapshot})
    else:
        click.echo(_snapshot_summary(snapshot))
    if snapshot["state"] != "done":
        raise click.exceptions.Exit(EXIT_PROBLEM)


def _receiving(report: Json, peer: str) -> Json | None:
    for snap in report.get("snapshots", []):
        if snap["peer"] == peer and snap["direction"] == "receiving":
            return dict(snap)
    return None


def _is_new(current: Json, previous: Json | None) -> bool:
    """Whether ``current`` is another snapshot than ``previous``: by its start time when the
    node reports one, else by any difference (two tiny snapshots can report the same)."""
    if previous is None:
        return True
    if "started_at" in current:
        return bool(current["started_at"] != previous.get("started_at"))
    return current != previous or current["state"] == "running"


def _follow_snapshot(target: Target, peer: str, previous: Json | None, timeout: float) -> Json:
    """Poll status until a new snapshot from ``peer`` ends, showing progress on a terminal."""
    live = sys.stdout.isatty() and not target.as_json
    deadline = time.monotonic() + timeout
    started = False
    while time.monotonic() < deadline:
        time.sleep(0.05)
        current = _receiving(target.get("/api/replication/status"), peer)
        if current is None:
            continue
        started = started or _is_new(current, previous)
        if not started:
            continue
        if current["state"] != "running":
            if live:
                click.echo("\r\x1b[K", nl=False)
            return current
        if live:
            click.echo(f"\r\x1b[K  {_snapshot_summary(current)}", nl=False)
    if live:
        click.echo()
    raise Problem(
        f"no snapshot from {peer} finished within {fmt.duration(timeout)} "
        "(see `replicator status --verbose`)"
    )


def _snapshot_summary(snap: Json) -> str:
    text = (
        f"Snapshot from {snap['peer']} {snap['state']}: {snap['percent']:.1f}% "
        f"({fmt.count(snap['rows'])}/{fmt.count(snap['total_rows'])} rows, "
        f"{fmt.size(snap['bytes'])}, {fmt.duration(snap['seconds'])})"
    )
    return f"{text}: {snap['error']}" if snap.get("error") else text


@main.command()
@node_options
def checkpoint(target: Target) -> None:
    """Record where replication stands now.

    A checkpoint holds this node's version vector and each peer's acknowledged position;
    the newest are listed by `status --verbose`.
    """
    answer = target.post("/api/replication/checkpoint")

    def render(answer: Json) -> list[str]:
        lines = [
            f"Checkpoint {answer['id']} taken {fmt.local_time(answer['taken_at'])} "
            f"({answer['reason']})."
        ]
        lines += fmt.block([("version vector", _vector_text(answer["version_vector"]))])
        rows = [
            (peer, facts.get("state", fmt.NONE), fmt.count(facts.get("acked_position")))
            for peer, facts in answer["peers"].items()
        ]
        if rows:
            lines += ["", *_indent(fmt.table(["PEER", "STATE", "ACKED"], rows, right={2}))]
        return lines

    target.show(answer, render)


@main.command()
@node_options
def validate(target: Target) -> None:
    """Compare table checksums with every peer.

    The checksums are compared at the same version vector, with every connected peer.
    Exits 1 when a table differs, or when a peer could not be compared (not connected, or
    writes in flight): consistency is then not confirmed.
    """
    answer = target.post("/api/replication/validate")

    def render(answer: Json) -> list[str]:
        divergent = answer["divergent_tables"]
        if divergent:
            head = click.style(f"DIVERGENT: {', '.join(divergent)}", fg="red", bold=True)
        elif answer["consistent"]:
            head = "Consistent: every table matches every peer."
        else:
            head = click.style(
                "Not confirmed: some peers could not be compared.", fg="yellow", bold=True
            )
        lines = [head, *fmt.block([("version vector", _vector_text(answer["version_vector"]))])]
        rows = [(name, fmt.count(t["rows"]), t["checksum"]) for name, t in answer["tables"].items()]
        lines += ["", *_indent(fmt.table(["TABLE", "ROWS", "CHECKSUM"], rows, right={1}))]
        peer_rows = []
        for peer, result in answer["peers"].items():
            if not result["compared"]:
                outcome = result.get("reason", "not compared")
            elif result.get("divergent_tables"):
                outcome = f"differs: {', '.join(result['divergent_tables'])}"
            else:
                outcome = "same checksums"
            peer_rows.append((peer, fmt.yes_no(result["compared"]), outcome))
        if peer_rows:
            headers = ["PEER", "COMPARED", "RESULT"]
            lines += ["", *_indent(fmt.table(headers, peer_rows))]
        return lines

    target.show(answer, render)
    if not answer["consistent"]:
        raise click.exceptions.Exit(EXIT_PROBLEM)


@main.command()
@node_options
def promote(target: Target) -> None:
    """Make a replica accept local writes (failover). Its peers see it as primary."""
    answer = target.post("/api/replication/promote")

    def render(answer: Json) -> list[str]:
        role = answer["role"]
        if role != "primary":
            return [
                f"This node's role is {role}: in its mode every node accepts writes already,",
                "so promote changes nothing that matters.",
            ]
        if not answer["changed"]:
            return ["This node is already primary: nothing changed."]
        return [
            "Promoted: this node is now primary and accepts local writes.",
            "If the old primary comes back as primary too, status raises a split-brain alarm.",
        ]

    target.show(answer, render)
