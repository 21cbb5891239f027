replication {
  mode = "primary"

  # Data filtering
  filters = {
    # Include only specific zones
    zones = ["wan", "lan"]

    # Exclude sensitive data
    exclude_sensitive = true

    # Custom filters
    custom_filters = [
      {
        type = "dhcp"
        condition = "scope != 'test'"
      },
      {
        type = "dns"
        condition = "ttl > 60"
      }
    ]
  }

  # Transformations
  transformations = {
    anonymize_ips = false
    compress_data = true
    encrypt_data = true
  }
}
