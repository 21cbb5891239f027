"""Sync: the conversation with each peer (connection, link, membership), and what keeps peers
equal (snapshots, resyncs, divergence repair, log retention, row filters)."""

# Callers import the module they need (e.g. `replicator.sync.checkpoints`):
# the package itself exports nothing.
__all__: list[str] = []
