# A two-node active-active pair on one machine: node2 on 127.0.0.2, its peer on 127.0.0.1.
#   replicator run -c conf/node2.hcl
# Replace the secret before using this anywhere real ('replicator keygen PATH' writes one,
# then use secret_key_file = PATH).

state {
  path   = "/var/tmp/replicator/node2/state.db"
  schema = "schema.sql"
  database {
    journal_mode = "WAL"
    synchronous  = "NORMAL"
  }
  backup {
    enabled   = true
    directory = "/var/tmp/replicator/node2/backups"
    interval  = "1h"
    retention = { hourly = 24, daily = 7, weekly = 4 }
  }
  recovery {
    auto_recover      = true
    validate_on_start = true
  }
}

replication {
  mode        = "active-active"
  node_id     = "node2"
  cluster_id  = "example"
  listen_addr = "127.0.0.2:9001"
  peers = [
    { id = "node1", address = "127.0.0.1:9001", role = "peer" }
  ]
  auth = {
    method     = "psk"
    secret_key = "example only - change me before use"
  }
  transport = { protocol = "tcp", compression = true, encryption = true }
  sync      = { mode = "incremental", interval = "1s", batch_size = 1000, max_lag = "10s" }
  data      = { dhcp_leases = true, dns_records = true, configuration = true }
  conflict_resolution = {
    strategy             = "timestamp"
    clock_skew_tolerance = "100ms"
    max_clock_offset     = "60s"
  }
  control_socket = "/var/tmp/replicator/node2/control.sock"
}
