"""The state store on real nodes: two `replicator run` processes on 127.0.0.1 and 127.0.0.2
replicating ``state_kv``, applications writing with `StateStore` beside them, a restart, a
purge on one node only, the node's /metrics, the example configs in conf/store, and the
README's guide to them, run as written."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replicator.config import load_config
from replicator.harness import NodeProcess, wait_until
from replicator.state import TABLE, BatchedWriter, StateStore

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- state-store-example: run by tests/process/test_state_store_nodes.py -->"
PYTHON_MARKER = "<!-- state-store-python: run by tests/process/test_state_store_nodes.py -->"
EXAMPLE_STATE = Path("/var/tmp/replicator")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    a = NodeProcess(tmp_path, "a", "127.0.0.1", tables="state_kv = true")
    b = NodeProcess(tmp_path, "b", "127.0.0.2", tables="state_kv = true")
    a.start([b])
    b.start([a])
    try:
        wait_until(lambda: connected(a) and connected(b), what="a and b to connect")
        yield a, b
    finally:
        a.stop()
        b.stop()


def connected(node: NodeProcess) -> bool:
    return all(peer["state"] == "connected" for peer in node.status()["peers"])


def stored(node: NodeProcess) -> dict[tuple[str, str], int | None]:
    """Every row of the store's table, expired ones too: (scope, key) -> expires_at."""
    return {
        (scope, key): expires
        for scope, key, _value, expires in node.rows(TABLE)
        if scope != "_repl_expiry"
    }


def scrape(node: NodeProcess) -> dict[str, float]:
    """The node's replicator_store_* samples, from GET /metrics on its control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(node.control_socket))
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    text = data.partition(b"\r\n\r\n")[2].decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("replicator_store_")
    }


def test_a_value_set_on_one_node_appears_on_the_other_and_survives_a_restart(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    a, b = pair
    with StateStore(a.db_path) as on_a, StateStore(b.db_path) as on_b:
        assert on_a.replicated
        on_a.set("leases/02:00:00:00:00:01", {"ip": "10.0.0.10", "host": "printer"})
        with on_a.transaction():
            on_a.scope("dns").set("printer.lan", "10.0.0.10")
            on_a.scope("dns").set("nas.lan", "10.0.0.11")
        with BatchedWriter(on_a, interval=0.05) as writer:
            for n in range(300):
                writer.set("flows/seen", n)
        wait_until(lambda: on_b.get("flows/seen") == 299, what="a's writes on b")
        assert on_b.get("leases/02:00:00:00:00:01") == {"ip": "10.0.0.10", "host": "printer"}
        assert on_b.scope("dns").items() == [("nas.lan", "10.0.0.11"),
                                             ("printer.lan", "10.0.0.10")]  # fmt: skip
        assert on_b.delete("leases/02:00:00:00:00:01")  # and back the other way
        wait_until(lambda: on_a.get("leases/02:00:00:00:00:01") is None, what="b's delete on a")
        counted = on_a.metrics()

    # a's application process counted; a's node exports it (once the store published).
    wanted = {f"replicator_store_{name}_total": counted[name]
              for name in ("reads", "writes", "deletes", "hits", "misses")}  # fmt: skip
    wait_until(lambda: {k: scrape(a).get(k) for k in wanted} == wanted,
               what="a's store counted on a's /metrics")  # fmt: skip
    assert counted["writes"] >= 4  # the lease, two names, and the coalesced flows/seen
    metrics = scrape(a)
    assert metrics["replicator_store_keys"] == 3  # flows/seen and two dns names
    assert metrics["replicator_store_hit_ratio"] == pytest.approx(counted["hit_ratio"])

    b.stop()
    with StateStore(a.db_path) as on_a:
        on_a.set("while b was down", True)
    b.start([a])
    wait_until(lambda: connected(b), what="b to come back")
    with StateStore(b.db_path) as on_b:
        wait_until(lambda: on_b.get("while b was down") is True, what="the write b missed")
        assert on_b.get("flows/seen") == 299  # b's own file kept the rest
        assert on_b.scope("dns").keys() == ["nas.lan", "printer.lan"]


def test_a_purge_on_one_node_keeps_checksums_equal_and_never_beats_a_newer_set(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    a, b = pair
    on_a = StateStore(a.db_path, purge_margin=0.2)
    on_b = StateStore(b.db_path, purge_margin=0.2)
    try:
        for key in ("lease/1", "lease/2", "lease/3"):
            on_a.set(key, f"{key} from a", ttl=0.5)
        on_a.set("kept", "no expiry")
        wait_until(lambda: len(stored(b)) == 4, what="a's keys on b")
        time.sleep(0.8)  # every lease expired, more than the margin ago
        assert on_a.keys() == on_b.keys() == ["kept"]

        # Set again on b after the expiry and received before a purges: a keeps it.
        on_b.set("lease/2", "set again on b")
        wait_until(lambda: on_a.get("lease/2") == "set again on b", what="b's set on a")
        # Set again on b while a applies nothing: a purges the old version first...
        a.post("/api/replication/pause")
        on_b.set("lease/1", "set again on b, later")
        time.sleep(0.5)
        assert stored(a)[("default", "lease/1")] is not None  # still the expired version
        assert on_a.purge_expired() == 2  # lease/1 and lease/3
        a.post("/api/replication/resume")
        # ...and the newer set still comes in.
        wait_until(lambda: on_a.get("lease/1") == "set again on b, later", what="b's later set")

        assert ("default", "lease/3") not in stored(a)  # purged on a only
        assert stored(b)[("default", "lease/3")] is not None
        for node in (a, b):
            wait_until(lambda node=node: node.post("/api/replication/validate")["consistent"],
                       what=f"{node.node_id}'s checksums to agree")  # fmt: skip
            divergence = node.status()["divergence"]
            assert divergence["edited_behind_replication"] == 0
            assert divergence["rows_repaired"] == 0

        assert on_b.purge_expired() == 1  # b catches up in its own time
        # b first: a node's heartbeats show its own latest local write (here b's cutoff) only
        # once it reads its vector again, which validate does.
        wait_until(lambda: all(n.post("/api/replication/validate")["consistent"] for n in (b, a)),
                   what="checksums to agree after b purged too")  # fmt: skip
        assert (
            on_a.items()
            == on_b.items()
            == [
                ("kept", "no expiry"),
                ("lease/1", "set again on b, later"),
                ("lease/2", "set again on b"),
            ]
        )
    finally:
        on_a.close()
        on_b.close()


def test_the_example_store_pair_replicates_the_state_table() -> None:
    pair_example = load_config(ROOT / "conf" / "node1.hcl").replication
    for n, peer in ((1, 2), (2, 1)):
        config = load_config(ROOT / "conf" / "store" / f"node{n}.hcl")
        replication = config.replication
        assert replication.replicated_tables() == (TABLE,)
        assert (replication.listen_host, replication.listen_port) == (f"127.0.0.{n}", 9011)
        assert replication.listen_port != pair_example.listen_port  # runs beside conf/node*.hcl
        assert [(p.id, p.host, p.port) for p in replication.peers] == [
            (f"store-node{peer}", f"127.0.0.{peer}", 9011)
        ]
        directory = EXAMPLE_STATE / f"store-node{n}"
        assert config.state.path == str(directory / "state.db")
        assert replication.control_socket == str(directory / "control.sock")
        assert config.state.schema is not None
        assert "CREATE TABLE IF NOT EXISTS state_kv" in Path(config.state.schema).read_text()


def readme_blocks(marker: str, language: str, text: str | None = None) -> list[str]:
    """The fenced blocks that follow ``marker`` in the README (or in ``text``)."""
    text = (ROOT / "README.md").read_text() if text is None else text
    return re.findall(re.escape(marker) + rf"\n```{language}\n(.*?)```", text, re.DOTALL)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def test_the_readme_store_api_examples_run_as_written(tmp_path: Path) -> None:
    blocks = readme_blocks(PYTHON_MARKER, "python")
    if not blocks:
        pytest.skip(f"README.md has no state store API example yet (no {PYTHON_MARKER})")
    outputs = []
    for block in blocks:  # in order, in one directory: later blocks use what earlier wrote
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60, check=False)  # fmt: skip
        assert result.returncode == 0, block + result.stderr
        outputs.append(result.stdout)
    assert "{'ip': '10.0.0.10', 'host': 'printer'}" in outputs[0]  # the five lines


def test_the_readme_two_node_store_example_runs_as_written() -> None:
    blocks = readme_blocks(MARKER, "sh")
    if not blocks:
        pytest.skip(f"README.md has no two-node state store example yet (no {MARKER})")
    if not all(port_free(host, 9011) for host in ("127.0.0.1", "127.0.0.2")):
        pytest.skip("port 9011 is taken on 127.0.0.1 or 127.0.0.2")
    if shutil.which("curl") is None:
        pytest.skip("the example uses curl")
    for node in ("store-node1", "store-node2"):  # the example's state, from an earlier run
        shutil.rmtree(EXAMPLE_STATE / node, ignore_errors=True)
    result = subprocess.run(
        [
            "bash",
            "-c",
            "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
            + blocks[0]
            + "wait\n",
        ],  # a failing step must not leave the nodes running
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "{'ip': '10.0.0.10', 'host': 'printer'}" in result.stdout  # read back on node2
    assert "replicator_store_writes_total" in result.stdout  # counted on node1's /metrics
