"""`python -m replicator` runs the `replicator` command."""

from replicator.cli.commands import main

main()
