"""The `replicator` command."""

from __future__ import annotations

import signal
import sys

import click
import trio

from replicator import __version__
from replicator.config import Config, load_config
from replicator.errors import ReplicationError
from replicator.log import configure, get_logger
from replicator.node import Node


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="replicator")
def main() -> None:
    """Replicate the SQLite state of high-availability nodes between peers."""


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
    except BaseExceptionGroup as group:  # raised from inside the node's nursery
        matched, _ = group.split(ReplicationError)
        if matched is None:
            raise
        _fail(_first_leaf(matched))


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


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
