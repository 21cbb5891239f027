"""The source checkout the harness runs from: its root and the example schema its nodes load."""

from __future__ import annotations

from pathlib import Path

__all__ = ["APPLIANCE_TABLES", "ROOT", "SCHEMA"]

# The directory above the package: the repository's root in a source checkout (where the tests
# and scripts run), site-packages in an installed copy.
ROOT = Path(__file__).resolve().parent.parent.parent
# The two tables every local cluster writes (as in conf/schema.sql), for an installed copy
# without conf/.
APPLIANCE_TABLES = """\
CREATE TABLE IF NOT EXISTS dhcp_leases (
    mac TEXT PRIMARY KEY, ip TEXT NOT NULL UNIQUE, hostname TEXT,
    scope TEXT NOT NULL DEFAULT 'lan', expires INTEGER NOT NULL, client_id BLOB);
CREATE TABLE IF NOT EXISTS dns_records (
    name TEXT NOT NULL, type TEXT NOT NULL, zone TEXT NOT NULL, value TEXT NOT NULL,
    ttl INTEGER NOT NULL DEFAULT 300, created_at INTEGER, updated_at INTEGER,
    PRIMARY KEY (name, type, zone)) WITHOUT ROWID;
"""
_EXAMPLE = ROOT / "conf" / "schema.sql"
SCHEMA = _EXAMPLE.read_text() if _EXAMPLE.is_file() else APPLIANCE_TABLES
