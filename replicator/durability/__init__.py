"""Durability: backups, validation and recovery at start, a disk that refuses writes, and the
configuration history."""

# Callers import the module they need (e.g. `replicator.durability.backup`):
# the package itself exports nothing.
__all__: list[str] = []
