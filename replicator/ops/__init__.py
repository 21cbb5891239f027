"""Operations: the control socket's server, its API routes, the metrics, and the client the
CLI uses."""
