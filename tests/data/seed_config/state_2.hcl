state {
  path = "/var/lib/flywall/state.db"

  # Database settings
  database {
    journal_mode = "WAL"
    synchronous = "NORMAL"
    cache_size = 10000
    temp_store = "memory"
    mmap_size = "256MB"
  }

  # What to persist
  persistence {
    dhcp_leases = true
    dns_cache = true
    dns_records = true
    conntrack = false  # Usually not persisted
    learning_state = true
    metrics_history = true
    configuration = true
  }

  # Backup configuration
  backup {
    enabled = true
    directory = "/var/lib/flywall/backups"
    interval = "1h"
    retention = {
      hourly = 24
      daily = 7
      weekly = 4
      monthly = 12
    }

    # Compression
    compression = true
    compression_level = 6

    # Encryption
    encryption = true
    encryption_key = "/etc/flywall/backup.key"
  }

  # Recovery settings
  recovery {
    auto_recover = true
    validate_on_start = true
    max_recovery_attempts = 3
    recovery_timeout = "30s"
  }

  # Sync settings
  sync {
    mode = "full"  # full, incremental
    batch_size = 1000
    sync_timeout = "10s"
  }
}
