"""Operations: the control socket's server, its API routes, the metrics, and the client the
CLI uses."""

# Callers import the module they need (e.g. `replicator.ops.api`):
# the package itself exports nothing.
__all__: list[str] = []
