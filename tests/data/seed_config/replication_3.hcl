replication {
  mode = "active-active"

  # Conflict resolution
  conflict_resolution = {
    strategy = "timestamp"  # timestamp, priority, manual

    # Priority-based resolution
    priorities = {
      "node1" = 100
      "node2" = 50
      "node3" = 25
    }

    # Timestamp resolution
    timestamp_resolution = "millisecond"
    clock_skew_tolerance = "100ms"

    # Manual resolution
    manual_resolution = {
      require_approval = true
      approvers = ["admin", "ops"]
      timeout = "1h"
    }
  }
}
