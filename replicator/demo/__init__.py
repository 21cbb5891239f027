"""`replicator demo`: a local cluster started, written to and shown."""
