"""The demo a new user runs first: it must tell its story, converge, and leave nothing behind,
whether it runs to the end or is interrupted with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def demo_command() -> list[str]:
    """The README's first command when this interpreter is the one it sets up (.venv), so the
    script itself is exercised; the CLI command otherwise (no second environment built)."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() == (ROOT / ".venv").resolve():
        return [str(ROOT / "scripts" / "demo")]
    return [sys.executable, "-m", "replicator", "demo"]


def start_demo(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """The demo in its own temp dir under tmp_path (TMPDIR), so what it leaves is easy to find."""
    return subprocess.Popen(
        [*demo_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"},
    )


def stop(demo: subprocess.Popen[str]) -> None:
    """Whatever the test saw: no process and no open pipe left behind."""
    demo.kill()
    demo.wait()
    if demo.stdout is not None:
        demo.stdout.close()


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text`` (the demo's directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_nothing_left(tmp_path: Path) -> None:
    assert processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds leftover processes through /proc")
def test_short_demo_narrates_converges_and_cleans_up(tmp_path: Path) -> None:
    demo = start_demo(tmp_path, "--short")
    try:
        output, _ = demo.communicate(timeout=90)
    finally:
        stop(demo)
    assert demo.returncode == 0, output
    said = " ".join(output.split())  # narration is wrapped to the terminal's width
    assert "All three nodes are connected" in said
    assert "Conflict:" in said
    assert "newest write wins" in said
    assert "node1: printer-office node2: printer-office node3: printer-office" in said
    assert "killed with SIGKILL" in said
    assert "Restarting node3" in said
    assert "missed changes" in said
    assert "converged yes" in said
    assert "Traceback" not in output
    assert_nothing_left(tmp_path)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds leftover processes through /proc")
def test_ctrl_c_stops_every_process_promptly_and_removes_the_directory(tmp_path: Path) -> None:
    demo = start_demo(tmp_path, "--short")
    try:
        deadline = time.monotonic() + 20
        # Interrupt once the nodes and the applications are running.
        while not list(tmp_path.glob("*/node*/app.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(processes_mentioning(str(tmp_path))) >= 4
        interrupted = time.monotonic()
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=15)
    finally:
        stop(demo)
    assert time.monotonic() - interrupted < 10
    assert demo.returncode == 130, output
    assert "Interrupted" in output
    assert "Traceback" not in output
    assert_nothing_left(tmp_path)
