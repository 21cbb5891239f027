"""`replicator run` (a node in this process) and `replicator demo`."""

from __future__ import annotations

import signal
import sys

import click
import trio

from replicator.cli.app import (
    main,
)
from replicator.config import Config, load_config
from replicator.demo import run_demo
from replicator.errors import ReplicationError, first_leaf
from replicator.log import configure, get_logger
from replicator.node import Node


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
