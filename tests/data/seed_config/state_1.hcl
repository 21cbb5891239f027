# State persistence configuration
state {
  # Storage location
  path = "/var/lib/flywall/state.db"

  # Backup settings
  backup {
    enabled = true
    directory = "/var/lib/flywall/backups"
    interval = "1h"
    retention = "7d"
  }

  # Persistence options
  auto_save = true
  save_interval = "5m"
  compression = true
}
