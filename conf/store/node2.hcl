# Two nodes sharing the applications' key-value store (replicator.state.StateStore), on one
# machine: node2 on 127.0.0.2, its peer on 127.0.0.1 (ports 9011, beside conf/node*.hcl's 9001).
#   replicator run -c conf/store/node2.hcl
# Applications on this node open StateStore("/var/tmp/replicator/store-node2/state.db").
# Replace the secret before using this anywhere real ('replicator keygen PATH' writes one,
# then use secret_key_file = PATH).

state {
  path   = "/var/tmp/replicator/store-node2/state.db"
  schema = "../schema.sql"   # creates state_kv (and the example tables) in a new file
  database {
    journal_mode = "WAL"
    synchronous  = "NORMAL"
  }
}

replication {
  mode        = "active-active"
  node_id     = "store-node2"
  cluster_id  = "store-example"
  listen_addr = "127.0.0.2:9011"
  peers = [
    { id = "store-node1", address = "127.0.0.1:9011", role = "peer" }
  ]
  auth = {
    method     = "psk"
    secret_key = "example only - change me before use"
  }
  sync = { interval = "1s", max_lag = "10s" }
  data = { state_kv = true }   # the store's table, replicated like any other
  conflict_resolution = {
    strategy = "timestamp"     # the newest set of a key wins on every node
  }
  control_socket = "/var/tmp/replicator/store-node2/control.sock"
}
