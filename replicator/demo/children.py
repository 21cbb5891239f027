"""Every process the demo starts, registered as it starts so that cleanup can end them all."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from replicator.demo.interrupts import Interrupts
from replicator.harness import die_with_parent, spawn, stop_processes

__all__ = ["STOP_DEADLINE", "Children"]

STOP_DEADLINE = 6.0  # seconds a child gets after SIGTERM before SIGKILL


class Children:
    def __init__(self, interrupts: Interrupts) -> None:
        self.interrupts = interrupts
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path, *, own_group: bool) -> subprocess.Popen[bytes]:
        """Start ``args`` in ``log``'s directory, its output appended to ``log``. On Linux the
        child dies with the demo, even when the demo is killed."""
        with self.interrupts.deferred():
            process = spawn(
                args,
                log,
                cwd=log.parent,
                # Writers stay out of the terminal's process group: the demo stops them itself.
                process_group=0 if own_group else None,
                # The demo starts no threads, so running code between fork and exec is safe.
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
            self.processes.append(process)
        return process

    def stop(self, processes: Sequence[subprocess.Popen[bytes]], sig: int = signal.SIGTERM) -> None:
        """Signal, wait up to STOP_DEADLINE, then SIGKILL whatever is still there."""
        stop_processes(processes, sig, STOP_DEADLINE)

    def stop_all(self) -> None:
        self.stop(self.processes)
