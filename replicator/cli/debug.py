"""`debug PEER`: one link's internals."""

from __future__ import annotations

import re

import click

from replicator.cli import render as fmt
from replicator.cli.app import (
    Json,
    main,
)
from replicator.cli.status import _error_text, _snapshot_lines
from replicator.cli.target import (
    Target,
    _alarm_lines,
    _indent,
    _section,
    node_options,
)


@main.command()
@click.option("--peer", "peer_id", metavar="ID", required=True, help="The peer to look at.")
@node_options
def debug(target: Target, peer_id: str) -> None:
    """Everything this node knows about one peer.

    Its link, positions, lag, clock skew, traffic, last checksum comparison, snapshots,
    last checkpoint, alarms that name it, and its last error.
    """
    report = target.get("/api/replication/status")
    lag_answer = target.get("/api/replication/lag")
    entry = next((p for p in report["peers"] if p["id"] == peer_id), None)
    if entry is None:
        known = ", ".join(p["id"] for p in report["peers"]) or "none"
        raise click.BadParameter(
            f"{report['node_id']} has no peer {peer_id!r} (peers: {known})", param_hint="--peer"
        )
    mention = re.compile(rf"(?<![\w-]){re.escape(peer_id)}(?![\w-])")
    divergence = report.get("divergence", {})
    checkpoints = [c for c in report.get("checkpoints", []) if peer_id in c.get("peers", {})]
    info: Json = {
        "node_id": report["node_id"],
        "peer": entry,
        "log_position": report["log_position"],
        "max_lag_seconds": lag_answer["max_lag_seconds"],
        "over_max_lag": entry["lag_seconds"] > lag_answer["max_lag_seconds"],
        "alarms": [alarm for alarm in report.get("alarms", []) if mention.search(alarm)],
        "divergence": {
            "checked_at": divergence.get("checked_at"),
            "divergent_tables": divergence.get("divergent_tables", {}).get(peer_id, []),
        },
        "snapshots": [s for s in report.get("snapshots", []) if s["peer"] == peer_id],
        "last_checkpoint": None
        if not checkpoints
        else {
            "id": checkpoints[0]["id"],
            "taken_at": checkpoints[0]["taken_at"],
            **checkpoints[0]["peers"][peer_id],
        },
    }
    if target.config is not None:
        configured = {p.id: p for p in target.config.replication.peers}.get(peer_id)
        info["configured"] = None if configured is None else {
            "address": configured.address, "role": configured.role
        }  # fmt: skip
    target.show(info, _debug_lines)


def _debug_lines(info: Json) -> list[str]:
    peer = info["peer"]
    skew = peer.get("skew_ms")
    lines = _alarm_lines(info["alarms"])
    lines.append(f"Peer {peer['id']}, as seen from {info['node_id']}")
    contact = peer.get("last_contact")
    divergence = info["divergence"]
    checkpoint = info["last_checkpoint"]
    configured = info.get("configured")
    lines += fmt.block(
        [
            ("address", f"{peer['address']} (from the config)"),
            *(
                [("configured", f"{configured['address']}, role {configured['role']}")]
                if configured
                else []
            ),
            ("state", peer["state"]),
            (
                "last contact",
                "never" if contact is None
                else f"{fmt.local_time(contact)} ({fmt.ago(peer['seconds_since_contact'])})",
            ),
            ("positions", f"sent {fmt.count(peer['sent_position'])}, acked "
                          f"{fmt.count(peer['acked_position'])} of "
                          f"{fmt.count(info['log_position'])}"),
            ("lag", f"{fmt.count(peer['lag_changes'])} changes, "
                    f"{fmt.duration(peer['lag_seconds'])} (max_lag "
                    f"{fmt.duration(info['max_lag_seconds'])}"
                    f"{', EXCEEDED' if info['over_max_lag'] else ''})"),
            ("in flight", f"{peer['in_flight_batches']} batches"),
            ("clock skew", fmt.NONE if skew is None else fmt.duration(skew / 1000)),
            ("traffic", f"in {fmt.size(peer['bytes_in'])}, out {fmt.size(peer['bytes_out'])}"),
            ("changes", f"sent {fmt.count(peer['changes_sent'])}, received "
                        f"{fmt.count(peer['changes_received'])}"),
            ("checksums", "not compared yet" if divergence["checked_at"] is None
             else f"last check {fmt.local_time(divergence['checked_at'])}: "
                  + (f"DIVERGENT: {', '.join(divergence['divergent_tables'])}"
                     if divergence["divergent_tables"] else "no divergent table")),
            ("checkpoint", "none" if checkpoint is None
             else f"#{checkpoint['id']} {fmt.local_time(checkpoint['taken_at'])}: acked "
                  f"{fmt.count(checkpoint.get('acked_position'))}"),
            ("alarms", len(info["alarms"]) or "none"),
            ("last error", _error_text(peer) if peer.get("last_error") else fmt.NONE),
        ]
    )  # fmt: skip
    lines += ["", _section("Snapshots")]
    lines += _indent(_snapshot_lines(info["snapshots"]))
    return lines
