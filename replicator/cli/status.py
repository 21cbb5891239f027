"""`status`, `peers`, `lag` and `queue status`: what the node reports, rendered."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import click

from replicator.cli import render as fmt
from replicator.cli.app import (
    EXIT_PROBLEM,
    Json,
    _Ordered,
    main,
)
from replicator.cli.target import (
    Target,
    _alarm_lines,
    _indent,
    _replication_state,
    _section,
    _vector_text,
    node_options,
)


@main.command()
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Everything: version vector, per-peer traffic and throughput, snapshots, "
    "divergence checks, checkpoints, conflicts.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    default=1.0,
    show_default=True,
    help="With --verbose: measure each peer's throughput over this many seconds (0: skip).",
)
@node_options
def status(target: Target, verbose: bool, interval: float) -> None:
    """The node at a glance: role, alarms, log position, peers.

    Exits 0 even when the node has alarms (they are printed first); `lag` and `validate`
    are the commands whose exit status reports a problem.
    """
    report = target.get("/api/replication/status")
    if target.as_json:
        target.dump(report)
        return
    earlier = None
    if verbose and interval > 0:
        earlier = report
        time.sleep(interval)
        report = target.get("/api/replication/status")
    lines = _status_verbose(report, earlier) if verbose else _status_compact(report)
    for line in lines:
        click.echo(line)


def _status_compact(report: Json) -> list[str]:
    lines = _alarm_lines(report.get("alarms", []))
    conflicts = report.get("conflicts", {})
    lines.append(
        f"Node {report['node_id']}: {report['role']} ({report['mode']}), "
        f"cluster {report['cluster_id']}, up {fmt.duration(report['uptime_seconds'])}"
    )
    lines += fmt.block(
        [
            ("replication", _replication_state(report["paused"])),
            ("log position", fmt.count(report["log_position"])),
            ("conflicts", f"{conflicts.get('open', 0)} open"),
            ("quarantined", f"{report.get('quarantined', 0)} changes"),
            ("alarms", len(report.get("alarms", [])) or "none"),
        ]
    )
    lines.append("")
    lines += _peer_table(report["peers"], verbose=False)
    return lines


def _peer_table(
    peers: Sequence[Json], *, verbose: bool, rates: Mapping[str, tuple[str, str]] | None = None
) -> list[str]:
    """One row per peer; ``verbose`` adds skew, traffic and (given ``rates``) throughput."""
    if not peers:
        return ["No peers configured."]
    headers = ["PEER", "STATE", "ADDRESS", "LAST CONTACT", "ACKED", "LAG", "LAG TIME"]
    if verbose:
        headers += ["SKEW", "SENT", "RECEIVED", "IN", "OUT"]
    if rates is not None:
        headers += ["RATE OUT", "RATE IN"]
    rows = []
    for peer in peers:
        row = [
            peer["id"],
            peer["state"],
            peer["address"],
            fmt.ago(peer.get("seconds_since_contact")),
            fmt.count(peer.get("acked_position")),
            fmt.count(peer.get("lag_changes")),
            _lag_time(peer),
        ]
        if verbose:
            skew = peer.get("skew_ms")
            row += [
                fmt.NONE if skew is None else fmt.duration(skew / 1000),
                fmt.count(peer.get("changes_sent")),
                fmt.count(peer.get("changes_received")),
                fmt.size(peer.get("bytes_in")),
                fmt.size(peer.get("bytes_out")),
            ]
        if rates is not None:
            row += rates.get(peer["id"], (fmt.NONE, fmt.NONE))
        rows.append(row)
    lines = fmt.table(headers, rows, right=set(range(4, len(headers))))
    # A last error is history once the link is up again: in the short view only for peers
    # that are not connected, in the verbose view always.
    errors = [
        (peer["id"], _error_text(peer))
        for peer in peers
        if peer.get("last_error") and (verbose or peer["state"] != "connected")
    ]
    if errors:
        lines += ["", "Last error:"]
        lines += fmt.block(errors)
    return lines


def _error_text(peer: Json) -> str:
    """The peer's last error, with how long ago it happened (it stays after a reconnect)."""
    at = peer.get("last_error_at")
    when = "" if at is None else f" ({fmt.ago(max(0.0, time.time() - at))})"
    return f"{peer['last_error']}{when}"


def _lag_time(peer: Json) -> str:
    """How long the peer has been missing changes: the oldest unacknowledged batch on a live
    link, or since a change first waited for a peer that is down. A peer that is down and
    lacks nothing shows "-" rather than a reassuring 0ms."""
    lag = peer.get("lag_seconds")
    if peer["state"] != "connected" and not lag:
        return fmt.NONE
    return fmt.duration(lag)


def _throughput(report: Json, earlier: Json | None) -> dict[str, tuple[str, str]] | None:
    """Changes (and bytes) per second out and in, from two reports a moment apart; the
    node's uptime is the clock, so the rate is exact whatever the request took."""
    if earlier is None:
        return None
    elapsed = float(report["uptime_seconds"] - earlier["uptime_seconds"])
    if elapsed <= 0:
        return None
    before = {peer["id"]: peer for peer in earlier["peers"]}
    rates = {}
    for peer in report["peers"]:
        old = before.get(peer["id"])
        if old is None:
            continue

        def per_second(field: str, old: Json = old, peer: Json = peer) -> float:
            return max(0.0, float(peer[field] - old[field])) / elapsed

        rates[peer["id"]] = (
            f"{fmt.rate(per_second('changes_sent'))} {fmt.size(per_second('bytes_out'))}/s",
            f"{fmt.rate(per_second('changes_received'))} {fmt.size(per_second('bytes_in'))}/s",
        )
    return rates


def _status_verbose(report: Json, earlier: Json | None) -> list[str]:
    lines = _alarm_lines(report.get("alarms", []))
    conflicts = report.get("conflicts", {})
    lines.append(_section("Node"))
    lines += fmt.block(
        [
            ("id", report["node_id"]),
            ("mode", f"{report['mode']} (role: {report['role']})"),
            ("cluster", report["cluster_id"]),
            ("origin", report["origin"]),
            ("listen", report["listen"]),
            ("uptime", fmt.duration(report["uptime_seconds"])),
            ("replication", _replication_state(report["paused"])),
            ("log position", fmt.count(report["log_position"])),
            ("conflicts open", conflicts.get("open", 0)),
            ("quarantined", f"{report.get('quarantined', 0)} changes"),
        ]
    )
    lines += ["", _section("Alarms")]
    lines += [f"  ! {alarm}" for alarm in report.get("alarms", [])] or ["  none"]

    lines += ["", _section("Version vector")]
    vector = report.get("version_vector", {})
    if vector:
        rows = [(origin, fmt.count(seq)) for origin, seq in vector.items()]
        lines += _indent(fmt.table(["ORIGIN", "SEQUENCE"], rows, right={1}))
    else:
        lines.append("  empty (nothing written yet)")

    rates = _throughput(report, earlier)
    window = "" if earlier is None else (
        f" (throughput over {fmt.duration(report['uptime_seconds'] - earlier['uptime_seconds'])})"
    )  # fmt: skip
    lines += ["", _section(f"Peers{window}")]
    lines += _indent(_peer_table(report["peers"], verbose=True, rates=rates))

    lines += ["", _section("Snapshots")]
    lines += _indent(_snapshot_lines(report.get("snapshots", [])))

    lines += ["", _section("Divergence")]
    lines += _indent(_divergence_lines(report.get("divergence", {})))

    lines += ["", _section("Checkpoints")]
    lines += _indent(_checkpoint_lines(report.get("checkpoints", [])))

    lines += ["", _section("Conflicts")]
    lines += _indent(_conflict_count_lines(conflicts))
    return lines


def _snapshot_lines(snapshots: Sequence[Json]) -> list[str]:
    if not snapshots:
        return ["none since start"]
    rows = [
        (
            snap["peer"],
            snap["direction"],
            snap["state"],
            f"{snap['percent']:.1f}%",
            f"{fmt.count(snap['rows'])}/{fmt.count(snap['total_rows'])}",
            fmt.size(snap["bytes"]),
            fmt.duration(snap["seconds"]),
            snap.get("error") or snap["reason"],
        )
        for snap in snapshots
    ]
    headers = ["PEER", "DIRECTION", "STATE", "PROGRESS", "ROWS", "BYTES", "TIME", "REASON/ERROR"]
    return fmt.table(headers, rows, right={3, 4, 5, 6})


def _divergence_lines(divergence: Json) -> list[str]:
    if not divergence.get("enabled", True):
        return ["checks disabled (recovery.divergence_check = false)"]
    checked = divergence.get("checked_at")
    divergent = divergence.get("divergent_tables", {})
    lines = fmt.block(
        [
            (
                "last check",
                "not yet"
                if checked is None
                else f"{fmt.local_time(checked)} "
                f"(took {fmt.duration(divergence['check_seconds'])})",
            ),
            ("at vector", _vector_text(divergence.get("vector", {}))),
            (
                "divergent",
                "; ".join(f"{peer}: {', '.join(tables)}" for peer, tables in divergent.items())
                or "none",
            ),
            (
                "repairs",
                f"{divergence.get('repairs_requested', 0)} requested, "
                f"{fmt.count(divergence.get('rows_repaired', 0))} rows repaired",
            ),
            ("edited behind", f"{divergence.get('edited_behind_replication', 0)} rows"),
        ],
        indent=0,
    )
    tables = divergence.get("tables", {})
    if tables:
        rows = [
            (name, fmt.count(t["rows"]), fmt.count(t.get("unversioned_rows")), t["checksum"])
            for name, t in tables.items()
        ]
        lines += ["", *fmt.table(["TABLE", "ROWS", "UNVERSIONED", "CHECKSUM"], rows, right={1, 2})]
    return lines


def _checkpoint_lines(checkpoints: Sequence[Json]) -> list[str]:
    if not checkpoints:
        return ["none yet"]
    rows = [
        (
            checkpoint["id"],
            fmt.local_time(checkpoint["taken_at"]),
            checkpoint["reason"],
            ", ".join(
                f"{peer}@{fmt.count(facts.get('acked_position'))}"
                for peer, facts in checkpoint.get("peers", {}).items()
            )
            or fmt.NONE,
        )
        for checkpoint in checkpoints
    ]
    return fmt.table(["ID", "TAKEN", "REASON", "PEERS ACKED"], rows, right={0})


def _conflict_count_lines(conflicts: Json) -> list[str]:
    lines = [f"{conflicts.get('open', 0)} open (replicator conflicts list)"]
    rows = [
        (table, strategy, kind, fmt.count(n))
        for table, strategies in conflicts.get("by_table", {}).items()
        for strategy, kinds in strategies.items()
        for kind, n in kinds.items()
    ]
    if rows:
        lines += ["", *fmt.table(["TABLE", "STRATEGY", "KIND", "COUNTED"], rows, right={3})]
    return lines


@main.command()
@node_options
def peers(target: Target) -> None:
    """Each peer: link, last contact, acknowledged position, lag.

    Also traffic and clock skew, and each peer's last error.
    """
    answer = target.get("/api/replication/peers")

    def render(answer: Json) -> list[str]:
        return _peer_table(answer["peers"], verbose=True)

    target.show(answer, render)


@main.command()
@node_options
def lag(target: Target) -> None:
    """How far behind each peer is; exit 1 when over max_lag.

    Made for monitoring: `watch -n 1 replicator lag`, or a check that alerts on exit 1.
    """
    answer = target.get("/api/replication/lag")
    max_lag = answer["max_lag_seconds"]

    def render(answer: Json) -> list[str]:
        lines = _alarm_lines(answer["lagging"])
        lines.append(
            f"Node {answer['node_id']}: log position {fmt.count(answer['log_position'])}, "
            f"max_lag {fmt.duration(max_lag)}, "
            f"worst lag {fmt.duration(answer['worst_lag_seconds'])}"
        )
        lines.append("")
        rows = [
            (
                peer["id"],
                peer["state"],
                fmt.count(peer["lag_changes"]),
                _lag_time(peer) + (" !" if peer["lag_seconds"] > max_lag else ""),
                fmt.count(peer["acked_position"]),
                fmt.ago(peer["seconds_since_contact"]),
            )
            for peer in answer["peers"]
        ]
        headers = ["PEER", "STATE", "BEHIND (CHANGES)", "LAG", "ACKED", "LAST CONTACT"]
        lines += fmt.table(headers, rows, right={2, 3, 4}) if rows else ["No peers configured."]
        down = [peer["id"] for peer in answer["peers"] if peer["state"] != "connected"]
        if down:
            lines += ["", f"Not connected: {', '.join(down)} (lag in time is measured on a live "
                          "link only; see `replicator peers`)."]  # fmt: skip
        return lines

    target.show(answer, render)
    if answer["lagging"]:
        raise click.exceptions.Exit(EXIT_PROBLEM)


@main.group(cls=_Ordered)
def queue() -> None:
    """What waits to be sent to each peer."""


@queue.command("status")
@node_options
def queue_status(target: Target) -> None:
    """Changes pending per peer, batches in flight, conflicts and quarantined changes."""
    answer = target.get("/api/replication/queue")

    def render(answer: Json) -> list[str]:
        lines = fmt.block(
            [
                ("replication", _replication_state(answer["paused"])),
                ("log position", fmt.count(answer["log_position"])),
                ("conflicts open", answer["conflicts_open"]),
                ("quarantined", f"{answer['quarantined']} changes"),
            ],
            indent=0,
        )
        rows = [
            (
                peer["id"],
                peer["state"],
                fmt.count(peer["pending_changes"]),
                fmt.count(peer["sent_position"]),
                fmt.count(peer["acked_position"]),
                peer["in_flight_batches"],
            )
            for peer in answer["peers"]
        ]
        headers = ["PEER", "STATE", "PENDING", "SENT", "ACKED", "IN FLIGHT"]
        lines += ["", *(fmt.table(headers, rows, right={2, 3, 4, 5}) if rows else ["No peers."])]
        return lines

    target.show(answer, render)
