"""`replicator demo` as a command: its directory, its exit status, and cleanup whatever
happens (Ctrl-C, an error), so that no process it started is left behind."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from replicator.demo.interrupts import Interrupts
from replicator.demo.scenario import FULL, SHORT, Demo
from replicator.errors import ReplicationError

__all__ = ["run_demo"]


def run_demo(*, short: bool = False, directory: str | None = None, keep: bool = False) -> int:
    """Run the demo; 0 when the three nodes converged, 1 when not (or a step failed), 2 for an
    unusable ``directory``, 130 when interrupted. Every process it started is stopped, and its
    temporary directory removed (unless ``keep``), before it returns."""
    out = sys.stdout
    interrupts = Interrupts()
    interrupts.install()
    root: Path | None = None
    remove = False
    demo: Demo | None = None
    status = 1
    try:
        if directory is None:
            root = Path(tempfile.mkdtemp(prefix="repl-demo-"))
            remove = not keep
        else:
            given = Path(directory).resolve()
            given.mkdir(parents=True, exist_ok=True)
            if any(given.iterdir()):
                print(f"replicator demo: {given} is not empty: give a new or empty directory")
                return 2
            root = given
        demo = Demo(root, SHORT if short else FULL, out, interrupts)
        status = 0 if demo.run() else 1
    except KeyboardInterrupt:
        print("\nInterrupted: stopping every node and application ...", file=out, flush=True)
        status = 130
    except ReplicationError as error:  # DemoError among them
        print(f"\nreplicator demo failed: {error}", file=out, flush=True)
        status = 1
    finally:
        interrupts.depth += 1  # from here on a signal is noted, not raised: cleanup must finish
        try:
            if demo is not None:
                demo.cluster.children.stop_all()
            if root is not None and remove:
                shutil.rmtree(root, ignore_errors=True)
            elif root is not None:
                print(f"Files kept in {root}", file=out, flush=True)
        finally:
            interrupts.restore()
    if status == 130:
        print("Stopped; nothing left running.", file=out, flush=True)
    return status
