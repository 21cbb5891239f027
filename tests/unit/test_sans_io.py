"""protocol/ must stay sans-IO: importing it may not pull in any I/O or node module."""

import subprocess
import sys

FORBIDDEN = ("trio", "socket", "sqlite3", "structlog", "asyncio", "selectors", "replicator")


def test_importing_protocol_loads_no_io_module() -> None:
    probe = (
        "import sys, protocol, protocol.session, protocol.codec, protocol.framing\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
