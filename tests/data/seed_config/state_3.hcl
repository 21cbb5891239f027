# DHCP persistence
dhcp {
  enabled = true

  persistence {
    enabled = true
    save_leases = true
    save_options = true
    save_reservations = true

    # Lease persistence across restarts
    persist_lease_time = true

    # Cleanup expired leases
    cleanup_expired = true
    cleanup_interval = "1h"
  }
}

# DNS persistence
dns {
  enabled = true

  persistence {
    enabled = true
    save_cache = true
    save_records = true
    save_blocklists = false

    # Cache persistence
    cache_ttl = "1d"
    max_cache_size = 100000

    # Record persistence
    persist_dynamic_records = true
    persist_statistics = true
  }
}

# Learning engine persistence
rule_learning {
  enabled = true

  persistence {
    enabled = true
    save_flows = true
    save_suggestions = true
    save_statistics = true

    # Data retention
    flow_retention = "7d"
    suggestion_retention = "30d"
    statistics_retention = "90d"

    # Cleanup
    cleanup_interval = "24h"
  }
}
