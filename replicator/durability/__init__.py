"""Durability: backups, validation and recovery at start, a disk that refuses writes, and the
configuration history."""
