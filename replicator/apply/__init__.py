"""Apply: a peer's changes into the state file, conflicts decided by the resolvers or queued
for the operator."""

# Callers import the module they need (e.g. `replicator.apply.applier`):
# the package itself exports nothing.
__all__: list[str] = []
