-- Example state schema: what a DHCP/DNS appliance keeps. Every key is unique across nodes
-- (natural keys or UUIDs), so two nodes inserting at the same time never collide.
CREATE TABLE IF NOT EXISTS dhcp_leases (
    mac         TEXT PRIMARY KEY,
    ip          TEXT NOT NULL UNIQUE,
    hostname    TEXT,
    scope       TEXT NOT NULL DEFAULT 'lan',
    expires     INTEGER NOT NULL,
    client_id   BLOB
);
CREATE TABLE IF NOT EXISTS dns_records (
    name        TEXT NOT NULL,
    type        TEXT NOT NULL,
    zone        TEXT NOT NULL,
    value       TEXT NOT NULL,
    ttl         INTEGER NOT NULL DEFAULT 300,
    created_at  INTEGER,
    updated_at  INTEGER,
    PRIMARY KEY (name, type, zone)
) WITHOUT ROWID;
-- Keyed by node id and config hash so every node's history replicates without collisions.
CREATE TABLE IF NOT EXISTS config_history (
    node_id     TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    config_data TEXT,
    applied_at  INTEGER NOT NULL,
    description TEXT,
    PRIMARY KEY (node_id, config_hash)
);
-- The applications' key-value store (replicator.state.StateStore): values are msgpack,
-- expires_at is unix milliseconds (NULL: never). Replicated where replication.data lists it.
CREATE TABLE IF NOT EXISTS state_kv (
    scope      TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      BLOB    NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
