"""Capture: this node's SQLite state file, its tables and triggers, the rows and clock they
stamp, and the reading of the change log the triggers fill."""

from replicator.capture.transactions import read_transaction, write_transaction

__all__ = ["read_transaction", "write_transaction"]
