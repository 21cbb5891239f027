"""The `replicator` command group: its exit codes, how errors become one line and an exit
code, and the group every command module registers on.

Every operator command is a thin client of the control API (`replicator.ops.client`): it asks
the node, then prints the answer as aligned text or, with ``--json``, as the node sent it.
Exit codes are part of the interface, so scripts and monitoring can act on them.
"""

from __future__ import annotations

from typing import Any

import click

from replicator import __version__
from replicator.errors import ConfigError, ReplicationError
from replicator.ops.client import NodeUnreachable, RequestFailed

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
