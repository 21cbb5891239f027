"""Several nodes in one process: `tests.support.cluster_sim.SimNode`s exchanging log entries,
or real `Node`s over `tests.support.memory_network.MemoryNetwork`. No socket, no child process."""
