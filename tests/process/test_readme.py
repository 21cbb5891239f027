"""The README's five-minute pair guide, run exactly as written, so it cannot rot."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATE = Path("/var/tmp/replicator")


def guide() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- pair-guide[^>]*-->\n```sh\n(.*?)```", readme, re.DOTALL)
    assert found, "the README lost its pair guide"
    return found.group(1)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def test_the_pair_guide_replicates_a_lease_and_shows_the_pair() -> None:
    if not all(port_free(host, 9001) for host in ("127.0.0.1", "127.0.0.2")):
        pytest.skip("port 9001 is taken on 127.0.0.1 or 127.0.0.2")
    if shutil.which("sqlite3") is None or shutil.which("curl") is None:
        pytest.skip("the guide uses the sqlite3 and curl commands")
    for node in ("node1", "node2"):  # the guide's example state, from an earlier run
        shutil.rmtree(STATE / node, ignore_errors=True)
    # A step that fails must not leave the guide's nodes running (their ports are fixed).
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    script += guide() + "wait\n"
    result = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "02:00:00:00:00:01|10.0.0.10" in out  # read back from node2's file
    assert "node1" in out  # status --verbose of node2 lists its peer
    assert '"peers"' in out  # the lag answer from node1's socket, through curl
    assert "created" in out  # backup create
    assert "after the first lease" in out  # ...and it is listed
