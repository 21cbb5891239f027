# node2 of the three-node docker-compose cluster (docker-compose.yml): a full mesh on the
# compose network, peers reached by service name. The pre-shared key comes from the compose
# secret replicator_psk; the state and backups live in named volumes.

state {
  path   = "/var/lib/replicator/state.db"
  schema = "../schema.sql"
  backup {
    enabled   = true
    directory = "/var/backups/replicator"
    interval  = "1h"
    retention = { hourly = 24, daily = 7 }
  }
  recovery {
    auto_recover      = true
    validate_on_start = true
  }
}

replication {
  mode        = "multi-master"
  node_id     = "node2"
  cluster_id  = "compose"
  listen_addr = "0.0.0.0:9001"
  peers = [
    { id = "node1", address = "node1:9001" },
    { id = "node3", address = "node3:9001" }
  ]
  auth = { secret_key_file = "/run/secrets/replicator_psk" }
  sync = {
    interval           = "200ms"
    heartbeat_interval = "500ms"
    liveness_timeout   = "3s"
    max_lag            = "10s"
  }
  data = { dhcp_leases = true, dns_records = true, configuration = true }
  recovery = { checksum_interval = "5s" }
  control_socket = "/run/replicator/control.sock"
}
