replication {
  mode = "replica"

  # Recovery settings
  recovery = {
    auto_resync = true
    resync_threshold = 1000
    resync_interval = "1h"

    # Full resync settings
    full_resync = {
      schedule = "0 2 * * *"  # Daily at 2 AM
      compression = true
      checksum_verification = true
    }

    # Incremental recovery
    incremental = {
      enabled = true
      checkpoint_interval = "10m"
      max_checkpoints = 100
    }
  }

  # Backup before resync
  backup_before_resync = true
  backup_retention = "7d"
}
