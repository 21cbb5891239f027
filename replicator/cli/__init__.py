"""The `replicator` command."""

from replicator.cli.commands import main

__all__ = ["main"]
