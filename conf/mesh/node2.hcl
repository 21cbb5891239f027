# A three-node multi-master mesh on one machine: node2 on 127.0.0.2.
#   replicator run -c conf/mesh/node2.hcl
# Replace the secret before using this anywhere real.

state {
  path   = "/var/tmp/replicator/mesh/node2/state.db"
  schema = "../schema.sql"
}

replication {
  mode        = "multi-master"
  node_id     = "node2"
  cluster_id  = "example-mesh"
  listen_addr = "127.0.0.2:9101"
  peers = [
    { id = "node1", address = "127.0.0.1:9101", role = "peer" },
    { id = "node3", address = "127.0.0.3:9101", role = "peer" },
  ]
  auth = { method = "psk", secret_key = "example only - change me before use" }
  sync = { interval = "1s", batch_size = 1000, max_lag = "10s" }
  data = { dhcp_leases = true, dns_records = true, configuration = true }
  conflict_resolution = {
    strategy   = "priority"
    priorities = { node1 = 100, node2 = 50, node3 = 25 }
  }
  control_socket = "/var/tmp/replicator/mesh/node2/control.sock"
}
