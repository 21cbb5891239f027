"""The `replicator` command."""

from __future__ import annotations

import click

from replicator import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="replicator")
def main() -> None:
    """Replicate the SQLite state of high-availability nodes between peers."""
