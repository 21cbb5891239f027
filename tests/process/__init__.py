"""Real processes on this machine: `replicator run` nodes through `replicator.harness` (the
`nodes` fixture of tests/conftest.py kills them), the CLI, the demo, and application or applier
processes (`tests.support.proc_helpers`)."""
