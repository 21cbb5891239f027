# Replication configuration
replication {
  mode = "replica"
  listen_addr = "192.168.100.2:9001"
  primary_addr = "192.168.100.1:9001"
  peer_addr = "192.168.100.1:9002"
  secret_key = "SHARED_SECRET_KEY"
}
