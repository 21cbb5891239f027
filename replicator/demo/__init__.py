"""`replicator demo`: three nodes on this machine, an application writing on each, a conflict,
a crash and a recovery, then proof that all three hold the same data.

It is the first thing a new user runs, so everything in it is real: separate ``replicator run``
processes talking over TCP with a generated key, applications that write their SQLite files
with plain ``sqlite3`` in their own processes, and a live view read only through what an
operator has (each node's control socket, and the files). Whatever happens (Ctrl-C, an error,
a crash of the demo itself on Linux) no process is left behind.

- `command`: `run_demo`, the entry point: directory, exit status, cleanup.
- `scenario`: the story and its narration (`Demo`, `Pace`).
- `cluster`: the three nodes it drives (`DemoCluster`), set up, started and compared.
- `nodes`: one node (`DemoNode`, a `replicator.harness.NodeProcess`) and what the view reads.
- `application`: the application process writing each node's file.
- `view`, `screen`: the live view's lines, and the terminal they are drawn on.
- `children`, `interrupts`: every child process registered; signals held back around them.
"""

from replicator.demo.command import run_demo

__all__ = ["run_demo"]
