"""The name applications import migrations by (`from replicator.app_migrations import ...`),
kept as the README gives it; the code is `replicator.state.migrations`."""

from replicator.state.migrations import Migration, MigrationError, Migrations, Step

__all__ = ["Migration", "MigrationError", "Migrations", "Step"]
