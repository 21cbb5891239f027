"""Capture: this node's SQLite state file, its tables and triggers, the rows and clock they
stamp, and the reading of the change log the triggers fill."""
