replication {
  mode = "primary"
  node_id = "node1"
  listen_addr = "192.168.100.1:9001"

  # Multiple peers
  peers = [
    {
      id = "node2"
      address = "192.168.100.2:9001"
      role = "replica"
    },
    {
      id = "node3"
      address = "192.168.100.3:9001"
      role = "replica"
    }
  ]

  # Authentication
  auth = {
    method = "psk"
    secret_key = "32-char-secret-key-here"
    key_rotation = "24h"
  }

  # Transport settings
  transport = {
    protocol = "tcp"
    compression = true
    encryption = true
    tls = {
      cert_file = "/etc/flywall/replication.crt"
      key_file = "/etc/flywall/replication.key"
      ca_file = "/etc/flywall/ca.crt"
    }
  }

  # Replication settings
  sync = {
    mode = "incremental"
    interval = "1s"
    batch_size = 1000
    max_lag = "10s"
  }

  # Data to replicate
  data = {
    dhcp_leases = true
    dns_records = true
    learning_state = true
    configuration = true
    metrics = false
  }
}
