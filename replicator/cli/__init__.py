"""The `replicator` command: `app` holds the group and its exit codes; each other module is one
command group, imported here so it registers itself, in the order `--help` lists them."""

# isort: off
from replicator.cli import run, status, replication, conflicts, conflict_drill  # noqa: F401
from replicator.cli import debug, backup, state, keygen  # noqa: F401

# isort: on
from replicator.cli.app import main

__all__ = ["main"]
