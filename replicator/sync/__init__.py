"""Sync: the conversation with each peer (connection, link, membership), and what keeps peers
equal (snapshots, resyncs, divergence repair, log retention, row filters)."""
