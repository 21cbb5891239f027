"""The set-full checker of scripts/nemesis: pure functions over writers' journals and table dumps.

A journal line is one row a writer's transaction touched, written only after its COMMIT returned
(``ok`` true) or after the attempt failed (``ok`` false; the transaction was rolled back, or its
COMMIT raised and the outcome is unknown, so either presence or absence is accepted):

    {"w": "n1", "txn": 7, "at": 1700000000.1, "ok": true, "op": "insert", "mac": ..., "ip": ...}
    {"w": "n1", "txn": 9, "at": ..., "ok": true, "op": "delete", "mac": ..., "found": 1}
    {"w": "n1", "txn": 9, "at": ..., "ok": true, "op": "set", "name": ..., "value": "n1:9"}

A dump is what one node holds once replication has settled: every dhcp_leases row as
(mac, ip), every dns_records row as (name, value), and how many changes its log holds more than
once. Nothing here touches a process, a file or the clock, so it can be tested on its own.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FAILING = ("lost", "resurrected", "unexpected", "duplicated", "stale")


@dataclass
class Dump:
    """What one node holds: lease rows (mac, ip), DNS rows (name, value), changes applied twice."""

    leases: list[tuple[str, str]]
    dns: list[tuple[str, str]]
    applied_twice: int = 0


@dataclass
class Expected:
    """What the journals say every node must (and may) hold."""

    present: dict[str, str] = field(default_factory=dict)  # mac -> ip: committed, not deleted
    deleted: set[str] = field(default_factory=set)  # committed, then deleted by its writer
    maybe: dict[str, str] = field(default_factory=dict)  # failed attempts: either way is fine
    vanished: list[dict[str, Any]] = field(default_factory=list)  # deletes that found no row
    values: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # any written
    finals: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # last per writer
    names: set[str] = field(default_factory=set)  # DNS keys some transaction committed
    commits: int = 0  # committed transactions
    rows: Counter[str] = field(default_factory=Counter)  # committed rows by op
    failed: Counter[str] = field(default_factory=Counter)  # failed transactions by reason
    when: dict[str, float] = field(default_factory=dict)  # mac -> commit time (for the report)


@dataclass
class NodeFindings:
    """One node's misses; each list holds the keys concerned."""

    lost: list[str] = field(default_factory=list)
    resurrected: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # a journaled value no writer ended with
    leases: int = 0
    dns: int = 0


@dataclass
class Findings:
    """The whole run's verdict: each node's misses, and the DNS keys the nodes disagree on."""

    nodes: dict[str, NodeFindings]
    differing: dict[str, dict[str, str | None]]  # DNS key -> node -> its value, where they differ

    def total(self, kind: str) -> int:
        return sum(len(getattr(node, kind)) for node in self.nodes.values())

    @property
    def ok(self) -> bool:
        return not self.differing and not any(self.total(kind) for kind in FAILING)


def expected(journal: Iterable[Mapping[str, Any]]) -> Expected:
    """Fold the journals (each writer's lines in its commit order) into what must be held."""
    out = Expected()
    failed_txns: set[tuple[str, int]] = set()
    committed_txns: set[tuple[str, int]] = set()
    last: dict[tuple[str, str], str] = {}  # (writer, name) -> its last committed value
    after: dict[tuple[str, str], set[str]] = defaultdict(set)  # failed attempts after that
    for line in journal:
        op, writer, txn = line["op"], line["w"], (line["w"], int(line["txn"]))
        if not line["ok"]:
            if txn not in failed_txns:
                failed_txns.add(txn)
                out.failed[str(line.get("error", "error"))] += 1
            if op == "insert":
                out.maybe[line["mac"]] = line["ip"]
            elif op == "set":
                out.values[line["name"]].add(line["value"])
                after[(writer, line["name"])].add(line["value"])
            elif op == "delete" and line["mac"] in out.present:
                out.maybe[line["mac"]] = out.present.pop(line["mac"])
            continue
        committed_txns.add(txn)
        out.rows[op] += 1
        if op == "insert":
            out.present[line["mac"]] = line["ip"]
            out.when[line["mac"]] = float(line.get("at", 0.0))
        elif op == "delete":
            out.present.pop(line["mac"], None)
            out.deleted.add(line["mac"])
            if not line.get("found", 1):
                out.vanished.append(dict(line))
        elif op == "set":
            out.values[line["name"]].add(line["value"])
            out.names.add(line["name"])
            last[(writer, line["name"])] = line["value"]
            after[(writer, line["name"])] = set()
    out.commits = len(committed_txns)
    for (_, name), value in last.items():
        out.finals[name].add(value)
    for (_, name), values in after.items():
        out.finals[name] |= values
    for mac in out.maybe:
        out.deleted.discard(mac)
    return out


def check_node(want: Expected, dump: Dump) -> NodeFindings:
    """One node's dump against the journals: lost, resurrected, unexpected, duplicated, stale."""
    found = NodeFindings(leases=len(dump.leases), dns=len(dump.dns))
    macs = Counter(mac for mac, _ in dump.leases)
    ips = Counter(ip for _, ip in dump.leases)
    owner_of_ip = {ip: mac for mac, ip in {**want.maybe, **want.present}.items()}
    found.duplicated = [mac for mac, count in macs.items() if count > 1]
    for mac, ip in dump.leases:
        if mac in want.deleted:
            found.resurrected.append(mac)
        elif mac not in want.present and mac not in want.maybe:
            found.unexpected.append(mac)
            continue
        journaled_ip = want.present.get(mac, want.maybe.get(mac))
        if ips[ip] > 1 or (journaled_ip is not None and ip != journaled_ip):
            found.duplicated.append(mac)  # its ip under another mac, or another ip for it
        elif owner_of_ip.get(ip, mac) != mac:
            found.duplicated.append(mac)
    found.lost = sorted(set(want.present) - set(macs))
    found.lost += [f"{line['mac']} (no row at its delete)" for line in want.vanished]
    names = Counter(name for name, _ in dump.dns)
    for name, value in dump.dns:
        if names[name] > 1 and name not in found.duplicated:
            found.duplicated.append(name)
        if value not in want.values.get(name, ()):
            found.unexpected.append(f"{name}={value}")
        elif value not in want.finals.get(name, ()):
            found.stale.append(f"{name}={value}")
    found.lost += sorted(name for name in want.names if name not in names)
    found.duplicated = sorted(set(found.duplicated))
    found.resurrected.sort()
    found.unexpected.sort()
    return found


def winners(dumps: Mapping[str, Dump]) -> dict[str, dict[str, str | None]]:
    """The DNS keys whose value is not the same on every node, with each node's value."""
    held = {node: dict(dump.dns) for node, dump in dumps.items()}
    keys = {name for values in held.values() for name in values}
    out: dict[str, dict[str, str | None]] = {}
    for name in sorted(keys):
        seen = {node: values.get(name) for node, values in held.items()}
        if len(set(seen.values())) > 1:
            out[name] = seen
    return out


def check(journal: Iterable[Mapping[str, Any]], dumps: Mapping[str, Dump]) -> Findings:
    """Every node against the journals, and the nodes' DNS winners against each other."""
    want = expected(journal)
    return Findings(
        nodes={node: check_node(want, dump) for node, dump in dumps.items()},
        differing=winners(dumps),
    )


def summary(findings: Findings, dumps: Mapping[str, Dump]) -> list[str]:
    """The per-node and total table, as printed lines."""
    header = ("NODE", "LEASES", "DNS", "LOST", "RESURRECTED", "UNEXPECTED", "DUPLICATED",
              "STALE", "APPLIED-TWICE")  # fmt: skip
    rows: list[Sequence[str]] = [header]
    for node, seen in findings.nodes.items():
        rows.append(
            (node, str(seen.leases), str(seen.dns), *(str(len(getattr(seen, k))) for k in FAILING),
             str(dumps[node].applied_twice))
        )  # fmt: skip
    rows.append(
        ("total", "", "", *(str(findings.total(k)) for k in FAILING),
         str(sum(d.applied_twice for d in dumps.values())))
    )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]  # fmt: skip


def details(findings: Findings, want: Expected, started: float, limit: int = 5) -> list[str]:
    """Up to ``limit`` examples of each miss per node, with when the writer committed them."""
    lines = []
    for node, seen in findings.nodes.items():
        for kind in FAILING:
            keys = getattr(seen, kind)
            if not keys:
                continue
            shown = []
            for key in keys[:limit]:
                at = want.when.get(key)
                shown.append(key if at is None else f"{key} (committed at {at - started:.1f}s)")
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            lines.append(f"{node} {kind}: {', '.join(shown)}{more}")
    for name, values in list(findings.differing.items())[:limit]:
        lines.append(f"winner differs for {name}: {values}")
    return lines
