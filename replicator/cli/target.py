"""The node a command talks to (`--socket`, `-c`, `--json`), and the text helpers every
command's output shares."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from replicator.cli import render as fmt
from replicator.cli.app import (
    DEFAULT_SOCKET,
    EXIT_NODE_ERROR,
    REQUEST_TIMEOUT,
    Json,
    Problem,
)
from replicator.config import Config, load_config
from replicator.ops.client import ControlClient


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
