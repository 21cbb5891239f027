"""Child processes of a harness: started with their output in a log file, stopped for sure."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["die_with_parent", "spawn", "stop_processes"]


def spawn(
    args: Sequence[str],
    log: Path,
    *,
    cwd: Path,
    preexec_fn: Callable[[], None] | None = None,
    process_group: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` with no stdin, stdout and stderr appended to ``log``, Python unbuffered
    (so the log is current when it is read)."""
    with log.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            process_group=process_group,
            # Callers pass one only where no thread runs: code between fork and exec is safe.
            preexec_fn=preexec_fn,  # noqa: PLW1509
        )


def stop_processes(
    processes: Sequence[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, grace: float = 10.0
) -> None:
    """Send ``sig`` to every process still running, give them ``grace`` seconds together,
    then SIGKILL whatever is still there; every one has been waited for on return."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
