"""The local-cluster harness: real `replicator run` processes on this machine, configured,
started, watched and stopped. `replicator demo`, the tests and the scripts (bench, nemesis)
all drive their nodes through it.

It only spawns processes and observes them from outside, as an operator would (the config
file, the JSON log, the control socket over plain HTTP, the SQLite file), so it imports
nothing of the node or of any other replicator package: it sits on the floor just above
`replicator.log` / `errors` / `config` (scripts/check_imports.py), and whatever uses it may
sit anywhere above.

- `node_process`: one node's process handle (`NodeProcess`).
- `hcl`: its configuration file (`NodeConfig`).
- `processes`: starting a child with its output in a log, stopping it for sure.
- `addresses`: free loopback ports and one loopback address per node.
- `waiting`: polling with a deadline.
- `checkout`: the source checkout's root and the example schema.
"""

from replicator.harness.addresses import free_port, loopback_hosts
from replicator.harness.checkout import APPLIANCE_TABLES, ROOT, SCHEMA
from replicator.harness.hcl import NodeConfig
from replicator.harness.node_process import TEST_SECRET, NodeProcess
from replicator.harness.processes import die_with_parent, spawn, stop_processes
from replicator.harness.waiting import wait_until

__all__ = [
    "APPLIANCE_TABLES",
    "ROOT",
    "SCHEMA",
    "TEST_SECRET",
    "NodeConfig",
    "NodeProcess",
    "die_with_parent",
    "free_port",
    "loopback_hosts",
    "spawn",
    "stop_processes",
    "wait_until",
]
