"""`python -m replicator` runs the `replicator` command."""

from replicator.cli import main

main()
