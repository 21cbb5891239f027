"""The `replicator` command: run a node, and operate a running one through its control socket.

Every operator command is a thin client of the control API (`replicator.ops.client`): it asks
the node, then prints the answer as aligned text or, with ``--json``, as the node sent it.
Exit codes are part of the interface, so scripts and monitoring can act on them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import signal
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import trio

from replicator import __version__
from replicator.capture import hlc
from replicator.cli import render as fmt
from replicator.config import Config, load_config
from replicator.demo.cluster import run_demo
from replicator.errors import ConfigError, ReplicationError, first_leaf
from replicator.log import configure, get_logger
from replicator.node import Node
from replicator.ops.client import ControlClient, NodeUnreachable, RequestFailed

__all__ = [
    "DEFAULT_SOCKET",
    "EXIT_NODE_ERROR",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "main",
]

# Exit codes: part of the command's interface (documented in `replicator --help`).
EXIT_OK = 0
EXIT_PROBLEM = 1  # the command ran and reports a problem (divergence, lag, failed validation)
EXIT_USAGE = 2  # click's code for a bad option or argument; also an unreadable config
EXIT_UNREACHABLE = 3  # nothing answers on the control socket
EXIT_NODE_ERROR = 4  # the node answered with an error

DEFAULT_SOCKET = "/run/replicator/control.sock"
REQUEST_TIMEOUT = 30.0  # seconds for an answer; a node that takes longer counts as unreachable
LONG_REQUEST_TIMEOUT = 3600.0  # VACUUM, backups and restores rewrite whole files
TEST_KEY_PREFIX = "replicator-test-conflict-"

Json = dict[str, Any]


class Problem(Exception):
    """What a command found wrong, with the exit code that tells a script what it was (lag
    over the threshold, conflicts pending): the command's answer, not a failure of the system,
    so it stands outside `ReplicationError`."""

    def __init__(self, message: str, exit_code: int = EXIT_PROBLEM) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class _Ordered(click.Group):
    """Commands listed in the order they are defined: related ones stay together in help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


class _Cli(_Ordered):
    """The operator commands' failures turned into one stderr line and a documented exit
    code (`run` reports its own)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NodeUnreachable as error:
            _die(ctx, _with_hint(error), EXIT_UNREACHABLE)
        except RequestFailed as error:
            text = f"{error.error}: {error.details}" if error.details else error.error
            _die(ctx, text, EXIT_NODE_ERROR)
        except ConfigError as error:
            _die(ctx, _with_hint(error), EXIT_USAGE)
        except Problem as problem:
            _die(ctx, problem.message, problem.exit_code)


def _with_hint(error: ReplicationError) -> str:
    return f"{error.message} ({error.hint})" if error.hint else error.message


def _die(ctx: click.Context, message: str, code: int) -> None:
    click.echo(f"replicator: {message}", err=True)
    ctx.exit(code)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="replicator")
def main() -> None:
    """Replicate the SQLite state of high-availability nodes between peers.

    `replicator run -c FILE` runs a node. The other commands operate a running node through
    its control socket: after the command name give --socket PATH, or -c FILE to use the
    config's control_socket (default /run/replicator/control.sock), and --json for the node's
    answer as JSON instead of text.

    \b
    Exit status:
      0  success
      1  the command ran and reports a problem: validate found divergence, lag is over
         max_lag, state validate failed, test-conflict did not converge
      2  usage error (a bad option or argument, an unreadable config file)
      3  the node is unreachable (no socket, or nothing answers on it)
      4  the node answered with an error, printed as "replicator: <error>: <details>"
    """


# ---------------------------------------------------------------------------------------------
# run


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The node's HCL configuration file.",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    show_default=True,
    help="JSON lines, or readable console output (auto: console on a terminal).",
)
def run(config_path: str, log_format: str) -> None:
    """Run a node until SIGTERM or SIGINT."""
    configure(json=None if log_format == "auto" else log_format == "json")
    try:
        config = load_config(config_path)
        trio.run(_run_node, config)
    except ReplicationError as error:
        _fail(error)
    except Exception as error:  # from inside the node's nursery, or a bug: one line, never
        matched, _ = (  # a traceback on the terminal (the log line below keeps it)
            error.split(ReplicationError) if isinstance(error, BaseExceptionGroup) else (None, None)
        )
        if matched is not None:
            _fail(first_leaf(matched))
        leaf = first_leaf(error)
        get_logger("cli").error("node stopped by an unexpected error", exc_info=leaf)
        click.echo(f"replicator: stopped by an unexpected error: {type(leaf).__name__}: {leaf}",
                   err=True)  # fmt: skip
        sys.exit(1)


def _fail(error: BaseException) -> None:
    click.echo(f"replicator: {error}", err=True)
    sys.exit(2)


async def _run_node(config: Config) -> None:
    node = Node(config)
    log = get_logger("cli")
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for received in signals:
                    log.info("stopping", signal=signal.Signals(received).name)
                    await node.shutdown()
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        await node.run()


@main.command()
@click.option("--short", is_flag=True, help="A quick run (about 20 s), as CI uses it.")
@click.option(
    "--dir",
    "directory",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Put the nodes' files in DIR (kept) instead of a temporary directory.",
)
@click.option("--keep", is_flag=True, help="Keep the temporary directory afterwards.")
def demo(short: bool, directory: str | None, keep: bool) -> None:
    """Three replicating nodes on this machine: a live view, a conflict, a crash and a
    recovery, then a convergence check. Exits 0 when the nodes converged, 130 on Ctrl-C."""
    sys.exit(run_demo(short=short, directory=directory, keep=keep))


# ---------------------------------------------------------------------------------------------
# Talking to a node


@dataclass(frozen=True, slots=True)
class Target:
    """The node a command talks to, and how its answer is to be printed."""

    socket_path: str
    as_json: bool
    config: Config | None = None

    def client(self, timeout: float = REQUEST_TIMEOUT) -> ControlClient:
        return ControlClient(self.socket_path, timeout=timeout)

    def get(self, path: str) -> Json:
        return _object(self.client().get(path))

    def post(self, path: str, body: Any = None, *, timeout: float = REQUEST_TIMEOUT) -> Json:
        return _object(self.client(timeout).post(path, body))

    def show(self, answer: Any, render: Callable[[Any], Sequence[str]]) -> None:
        """The answer as indented JSON with --json, else the rendered lines."""
        if self.as_json:
            self.dump(answer)
        else:
            for line in render(answer):
                click.echo(line)

    def dump(self, answer: Any) -> None:
        click.echo(json.dumps(answer, indent=2))


def _object(answer: Any) -> Json:
    if not isinstance(answer, dict):
        raise Problem(f"unexpected answer from the node: {answer!r:.200}", EXIT_NODE_ERROR)
    return answer


def node_options(command: Callable[..., None]) -> Callable[..., None]:
    """--socket / -c / --json for a command that talks to a node; it gets a `Target` first."""

    @click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print the node's answer as JSON (as the API sent it, indented).",
    )
    @click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        help="The node's config file: talk to its control_socket.",
    )
    @click.option(
        "--socket",
        "socket_path",
        type=click.Path(dir_okay=False),
        metavar="PATH",
        help=f"The node's control socket.  [default: {DEFAULT_SOCKET}]",
    )
    @functools.wraps(command)
    def wrapper(
        socket_path: str | None, config_path: str | None, as_json: bool, **options: Any
    ) -> None:
        command(_target(socket_path, config_path, as_json), **options)

    return wrapper


def _target(socket_path: str | None, config_path: str | None, as_json: bool) -> Target:
    if socket_path is not None and config_path is not None:
        raise click.UsageError("give --socket PATH or -c FILE, not both")
    if config_path is not None:
        config = load_config(config_path)
        return Target(config.replication.control_socket, as_json, config)
    return Target(socket_path or DEFAULT_SOCKET, as_json)


def _section(title: str) -> str:
    return click.style(title, bold=True)


def _alarm_lines(alarms: Sequence[str]) -> list[str]:
    """Alarms first and loud: they are why someone runs `status`."""
    if not alarms:
        return []
    lines = [click.style(f"ALARMS ({len(alarms)})", fg="red", bold=True)]
    lines += [click.style(f"  ! {alarm}", fg="red") for alarm in alarms]
    return [*lines, ""]


def _indent(lines: Sequence[str], by: int = 2) -> list[str]:
    return [(" " * by + line) if line else line for line in lines]


def _replication_state(paused: object) -> str:
    return click.style("PAUSED", fg="yellow", bold=True) if paused else "running"


def _vector_text(vector: Mapping[str, Any]) -> str:
    return ", ".join(f"{origin}={seq}" for origin, seq in vector.items()) or fmt.NONE


# ---------------------------------------------------------------------------------------------
# status, peers, lag, queue


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


# ---------------------------------------------------------------------------------------------
# pause, resume, resync, checkpoint, validate, promote


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


# ---------------------------------------------------------------------------------------------
# conflicts


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


# ---------------------------------------------------------------------------------------------
# test-conflict


@main.command("test-conflict")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True),
    help="This node's config file.",
)
@click.option(
    "--peer-config",
    type=click.Path(dir_okay=False, exists=True),
    help="Its peer's config file (the peer must run on this machine too).",
)
@click.option(
    "--table",
    metavar="NAME",
    help="The replicated table to write the scratch row in (default: the first one a "
    "scratch row fits).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    default=30.0,
    show_default=True,
    help="How long to wait for each step to replicate.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON at the end.")
def test_conflict(
    config_path: str | None,
    peer_config: str | None,
    table: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Provoke a harmless conflict and show how it resolved.

    Needs both nodes' configs on this machine (a local pair, a lab, the demo): -c FILE for
    this node, --peer-config FILE for its peer, both running, connected and writable
    (active-active or multi-master). Steps: write a scratch row (key starting
    "replicator-test-conflict-") and wait for it to replicate; pause replication on both;
    update the row on both with different values; resume; wait until both hold the same
    value; print which write won and how the conflict counts moved (a manual-strategy
    conflict is shown, then resolved); delete the scratch row (a replicated delete).
    Replication is resumed whatever happens. Exits 1 if the nodes do not converge in time.
    """
    if config_path is None or peer_config is None:
        raise click.UsageError(
            "test-conflict writes into both nodes' state files: give this node's config "
            "with -c FILE and its peer's with --peer-config FILE (both on this machine)"
        )
    target = _target(None, config_path, as_json)
    assert target.config is not None
    result = _ConflictTest(target, target.config, load_config(peer_config), table, timeout).run()
    if target.as_json:
        target.dump(result)
    if not result["converged"]:
        raise click.exceptions.Exit(EXIT_PROBLEM)


@dataclass(frozen=True, slots=True)
class _Side:
    node_id: str
    config: Config
    client: ControlClient


@dataclass(frozen=True, slots=True)
class _Scratch:
    """Where the scratch row goes: its table, key columns and values, the column that differs."""

    table: str
    key: dict[str, object]
    filler: dict[str, object]
    column: str

    def where(self) -> tuple[str, list[object]]:
        clause = " AND ".join(f"{_ident(c)} = ?" for c in self.key)
        return clause, list(self.key.values())


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_WHY_IT_WON = {
    "timestamp": "the newer hybrid-logical-clock stamp",
    "priority": "the node with the higher priority",
    "manual": "the provisional winner, queued for review",
}


class _ConflictTest:
    def __init__(
        self, target: Target, local: Config, remote: Config, table: str | None, timeout: float
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.wanted_table = table
        self.a = _Side(local.replication.node_id, local, target.client())
        self.b = _Side(
            remote.replication.node_id, remote, ControlClient(remote.replication.control_socket)
        )
        self.result: Json = {}

    def say(self, line: str) -> None:
        """Narrate a step as it happens (the JSON answer comes at the end instead)."""
        if not self.target.as_json:
            click.echo(line)

    def run(self) -> Json:
        a, b = self.a, self.b
        reports = self._check_ready()
        scratch = self._scratch()
        resolution = a.config.replication.conflict_resolution
        strategy = resolution.tables.get(scratch.table, resolution.strategy)
        key_text = ", ".join(f"{c}={v!r}" for c, v in scratch.key.items())
        self.say(f"Scratch row: {scratch.table} ({key_text}); strategy {strategy}.")
        started = time.monotonic()
        self.result = {
            "table": scratch.table,
            "key": scratch.key,
            "column": scratch.column,
            "strategy": strategy,
            "converged": False,
        }
        before = {n: _conflicts_counted(r, scratch.table) for n, r in reports.items()}
        initial = f"{TEST_KEY_PREFIX}initial"
        self._write(a, scratch, initial, insert=True)
        if not self._wait(lambda: self._value(b, scratch) == (initial,)):
            self.say(
                f"The scratch row did not reach {b.node_id} in {fmt.duration(self.timeout)}"
                " (a replication filter? see `replicator status`)."
            )
            self._delete(a, scratch)
            return self.result
        self.say(f"  written on {a.node_id}, replicated to {b.node_id}")
        written = self._write_both_while_paused(scratch)
        self.say("  replication resumed; waiting for both nodes to agree...")

        def settled() -> bool:
            held = [self._value(side, scratch) for side in (a, b)]
            if held[0] != held[1] or held[0] is None:
                return False
            return all(
                sum(self._counted(s, scratch.table).values()) > sum(before[s.node_id].values())
                for s in (a, b)
            )

        converged = self._wait(settled)
        self._report(scratch, written, before, converged)
        if converged:
            self._close_queued(scratch)
        self._delete(a, scratch)
        gone = self._wait(lambda: self._value(b, scratch) is None)
        self.say(
            "  scratch row deleted on both nodes"
            if gone
            else f"  scratch row deleted on {a.node_id}; {b.node_id} has not applied it yet"
        )
        self.result["seconds"] = round(time.monotonic() - started, 3)
        self.say(f"Done in {fmt.duration(self.result['seconds'])}.")
        return self.result

    def _check_ready(self) -> dict[str, Json]:
        """Both nodes up, writable, running and connected to each other; their reports."""
        a, b = self.a, self.b
        if b.node_id not in {peer.id for peer in a.config.replication.peers}:
            raise click.UsageError(
                f"{b.node_id} (--peer-config) is not a configured peer of {a.node_id} (-c)"
            )
        reports = {}
        for side, other in ((a, b), (b, a)):
            report = _object(side.client.get("/api/replication/status"))
            if report["role"] != "peer":
                raise Problem(
                    f"{side.node_id} is {report['role']} ({report['mode']}): a conflict needs "
                    "two writable nodes (active-active or multi-master)"
                )
            if report["paused"]:
                raise Problem(f"replication is paused on {side.node_id}: resume it first")
            state = {p["id"]: p["state"] for p in report["peers"]}.get(other.node_id, "unknown")
            if state != "connected":
                raise Problem(f"{side.node_id} is not connected to {other.node_id} ({state})")
            reports[side.node_id] = report
        return reports

    def _write_both_while_paused(self, scratch: _Scratch) -> dict[str, str]:
        """Each node updates the row while neither can hear the other: concurrent writes."""
        sides = (self.a, self.b)
        written = {side.node_id: f"{TEST_KEY_PREFIX}from-{side.node_id}" for side in sides}
        try:
            for side in sides:
                side.client.post("/api/replication/pause")
            self.say(f"  replication paused on {self.a.node_id} and {self.b.node_id}")
            for side in sides:
                self._write(side, scratch, written[side.node_id], insert=False)
                self.say(f"  {side.node_id} wrote {scratch.column} = {written[side.node_id]!r}")
        finally:
            for side in sides:
                with contextlib.suppress(ReplicationError):
                    side.client.post("/api/replication/resume")
        return written

    def _report(
        self,
        scratch: _Scratch,
        written: dict[str, str],
        before: dict[str, dict[str, int]],
        converged: bool,
    ) -> None:
        sides = (self.a, self.b)
        held = {side.node_id: _first(self._value(side, scratch)) for side in sides}
        counted = {
            s.node_id: _increase(before[s.node_id], self._counted(s, scratch.table)) for s in sides
        }
        won = [node for node, value in written.items() if value == held[self.a.node_id]]
        winner = won[0] if won and converged else None
        self.result.update(
            written=written, held=held, winner=winner, conflicts_counted=counted,
            converged=converged,
        )  # fmt: skip
        if converged:
            why = _WHY_IT_WON.get(self.result["strategy"], "by the table's strategy")
            self.say(f"Both nodes hold {held[self.a.node_id]!r}: {winner}'s write won ({why}).")
        else:
            self.say(click.style(f"Not converged after {fmt.duration(self.timeout)}:", fg="red"))
            for line in fmt.block([(f"{n} holds", repr(v)) for n, v in held.items()]):
                self.say(line)
        for node, kinds in counted.items():
            increase = ", ".join(f"+{n} {kind}" for kind, n in kinds.items()) or "none"
            self.say(f"  conflicts counted on {node}: {increase}")

    def _close_queued(self, scratch: _Scratch) -> None:
        """A manual-strategy conflict waits for an operator: show it, then resolve it here."""
        query = urllib.parse.urlencode({"status": "open", "limit": 1000})
        found = _object(self.a.client.get(f"/api/replication/conflicts?{query}"))["conflicts"]
        key_values = [str(v) for v in scratch.key.values()]
        mine = [c for c in found if c["table"] == scratch.table
                and all(v in c["key"] for v in key_values)]  # fmt: skip
        self.result["queued_conflicts"] = [c["id"] for c in mine]
        for conflict in mine:
            self.say(
                f"  queued for review as conflict {conflict['id']} (provisional winner: "
                f"{conflict['winner']}); resolving it with --use local"
            )
            self.a.client.post(f"{_conflict_path(conflict['id'])}/resolve", {"use": "local"})

    def _scratch(self) -> _Scratch:
        a = self.a
        tables = a.config.replication.replicated_tables()
        if self.wanted_table is not None:
            if self.wanted_table not in tables:
                raise click.BadParameter(
                    f"{self.wanted_table!r} is not replicated (replicated: {', '.join(tables)})",
                    param_hint="--table",
                )
            tables = (self.wanted_table,)
        token = secrets.token_hex(4)
        with contextlib.closing(self._connect(a)) as conn:
            for table in tables:
                scratch = _scratch_for(conn, table, f"{TEST_KEY_PREFIX}{token}")
                if scratch is not None:
                    return scratch
        raise Problem(
            f"no replicated table takes a scratch row ({', '.join(tables)}): it needs a text "
            "primary-key column and a column besides the key"
        )

    def _connect(self, side: _Side) -> sqlite3.Connection:
        """The node's state file as an application would open it (never creating one)."""
        path = side.config.state.path
        try:
            conn = sqlite3.connect(
                f"file:{urllib.parse.quote(path)}?mode=rw", uri=True, timeout=10,
                isolation_level=None,
            )  # fmt: skip
            conn.execute("PRAGMA busy_timeout = 10000")
        except sqlite3.Error as error:
            raise Problem(f"cannot open {side.node_id}'s state file {path}: {error}") from None
        return conn

    def _write(self, side: _Side, scratch: _Scratch, value: str, *, insert: bool) -> None:
        try:
            with contextlib.closing(self._connect(side)) as conn:
                if insert:
                    row = {**scratch.key, **scratch.filler, scratch.column: value}
                    columns = ", ".join(_ident(c) for c in row)
                    marks = ", ".join("?" for _ in row)
                    conn.execute(
                        f"INSERT INTO {_ident(scratch.table)} ({columns}) VALUES ({marks})",
                        list(row.values()),
                    )
                else:
                    clause, params = scratch.where()
                    conn.execute(
                        f"UPDATE {_ident(scratch.table)} SET {_ident(scratch.column)} = ?"
                        f" WHERE {clause}",
                        [value, *params],
                    )
        except sqlite3.Error as error:
            raise Problem(
                f"cannot write the scratch row into {scratch.table} on {side.node_id}: {error}"
                " (try another table with --table)"
            ) from None

    def _delete(self, side: _Side, scratch: _Scratch) -> None:
        clause, params = scratch.where()
        with contextlib.closing(self._connect(side)) as conn:
            conn.execute(f"DELETE FROM {_ident(scratch.table)} WHERE {clause}", params)

    def _value(self, side: _Side, scratch: _Scratch) -> tuple[object] | None:
        clause, params = scratch.where()
        with contextlib.closing(self._connect(side)) as conn:
            row = conn.execute(
                f"SELECT {_ident(scratch.column)} FROM {_ident(scratch.table)} WHERE {clause}",
                params,
            ).fetchone()
        return None if row is None else (row[0],)

    def _counted(self, side: _Side, table: str) -> dict[str, int]:
        return _conflicts_counted(_object(side.client.get("/api/replication/status")), table)

    def _wait(self, condition: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.1)
        return condition()


def _first(value: tuple[object] | None) -> object:
    return None if value is None else value[0]


def _conflicts_counted(report: Json, table: str) -> dict[str, int]:
    """The table's conflicts counted so far, by kind (concurrent, near_tie...)."""
    counted: dict[str, int] = {}
    for kinds in report.get("conflicts", {}).get("by_table", {}).get(table, {}).values():
        for kind, n in kinds.items():
            counted[kind] = counted.get(kind, 0) + int(n)
    return counted


def _increase(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


def _scratch_for(conn: sqlite3.Connection, table: str, key: str) -> _Scratch | None:
    """A row that fits ``table``: text key columns get the scratch key, NOT NULL columns a
    placeholder of their type; the column that differs is a text one outside the key
    (nullable ones first: fewer constraints). None when the table has no such columns."""
    columns = conn.execute(f"PRAGMA table_info({_ident(table)})").fetchall()
    key_columns = sorted((pk, name, _affinity(decl)) for _, name, decl, _, _, pk in columns if pk)
    if not any(affinity == "text" for _, _, affinity in key_columns):
        return None
    differing = sorted(
        (notnull, cid, name)
        for cid, name, decl, notnull, _, pk in columns
        if not pk and _affinity(decl) == "text"
    )
    if not differing:
        return None
    column = differing[0][2]
    placeholders = {"text": key, "integer": 0, "real": 0.0, "blob": b""}
    filler = {
        name: placeholders[_affinity(decl)]
        for _, name, decl, notnull, default, pk in columns
        if notnull and default is None and not pk and name != column
    }
    scratch_key: dict[str, object] = {  # in primary-key order
        name: key if affinity == "text" else 0 for _, name, affinity in key_columns
    }
    return _Scratch(table, scratch_key, filler, column)


def _affinity(declared: str) -> str:
    """SQLite's column affinity rules, for choosing placeholder values."""
    upper = declared.upper()
    if "INT" in upper:
        return "integer"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")) or not upper:
        return "text" if upper else "blob"
    if "BLOB" in upper:
        return "blob"
    return "real"


# ---------------------------------------------------------------------------------------------
# debug


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


# ---------------------------------------------------------------------------------------------
# backup


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


# ---------------------------------------------------------------------------------------------
# state


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


# ---------------------------------------------------------------------------------------------
# keygen


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing file.")
def keygen(path: str, force: bool) -> None:
    """Write a new random cluster passphrase to PATH (mode 0600).

    Every node of a cluster needs the same key: copy the file to each, then point their
    configs at it with auth = { secret_key_file = "PATH" }. Needs no running node.
    """
    target = Path(path).absolute()
    key = secrets.token_urlsafe(32) + "\n"
    if target.exists() and not force:
        raise Problem(
            f"{target} exists: pass --force to replace it (nodes still using the old key "
            "will refuse the ones using the new one)"
        )
    try:
        _write_private(target, key, replace=force)
    except FileExistsError:
        raise Problem(f"{target} exists: pass --force to replace it") from None
    except OSError as error:
        raise Problem(f"cannot write {target}: {error.strerror}") from None
    for line in (
        f"Wrote a new cluster key to {target} (mode 0600).",
        "Copy it to every node of the cluster, then reference it in each node's config:",
        "",
        "  replication {",
        f'    auth = {{ secret_key_file = "{target}" }}',
        "  }",
        "",
        "Rotating keys: keep the old file as previous_secret_key_file until every node has",
        "the new one.",
    ):
        click.echo(line)


def _write_private(target: Path, text: str, *, replace: bool) -> None:
    """Create with mode 0600 from the first byte (O_EXCL: never through a planted file);
    a replacement is written beside the target and renamed over it, so it is atomic too."""
    path = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp") if replace else target
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as file:
            fd = -1
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(path, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
