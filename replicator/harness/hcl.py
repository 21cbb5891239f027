"""The HCL configuration file of a local node, written from one description of its settings."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["NodeConfig", "hcl_object", "hcl_value"]

Value = str | int | bool


def hcl_value(value: Value) -> str:
    """A string quoted (JSON's escapes are HCL's), a number or a bool bare."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def hcl_object(items: Mapping[str, Value]) -> str:
    """``{ key = value, ... }`` on one line."""
    return "{ " + ", ".join(f"{key} = {hcl_value(value)}" for key, value in items.items()) + " }"


@dataclass(slots=True)
class NodeConfig:
    """What one node's file says. An empty mapping or None leaves that block out, so the node
    takes the product's defaults; ``state_extra`` and ``extra`` are raw HCL lines appended to
    the state and replication blocks."""

    node_id: str
    listen_addr: str
    peers: Sequence[tuple[str, str]]  # (id, address) of each peer, in the order given
    cluster_id: str
    auth: Mapping[str, str]  # secret_key or secret_key_file
    state_path: str
    schema: str
    data: str  # the tables replicated, as HCL: "dhcp_leases = true, dns_records = true"
    mode: str = "active-active"
    database: Mapping[str, str] = field(default_factory=dict)  # SQLite pragmas
    sync: Mapping[str, Value] = field(default_factory=dict)
    transport: Mapping[str, Value] = field(default_factory=dict)
    strategy: str | None = None
    recovery: Mapping[str, Value] = field(default_factory=dict)
    control_socket: str = "control.sock"
    state_extra: str = ""
    extra: str = ""
    comment: str = ""  # a first line saying who wrote the file

    def render(self) -> str:
        lines = [f"# {self.comment}"] if self.comment else [""]
        lines += ["state {", f"  path   = {hcl_value(self.state_path)}"]
        lines.append(f"  schema = {hcl_value(self.schema)}")
        if self.database:
            lines.append("  database {")
            width = max(map(len, self.database))
            lines += [f"    {k:{width}} = {hcl_value(v)}" for k, v in self.database.items()]
            lines.append("  }")
        if self.state_extra:
            lines.append(self.state_extra)
        lines += [
            "}",
            "replication {",
            f"  mode        = {hcl_value(self.mode)}",
            f"  node_id     = {hcl_value(self.node_id)}",
            f"  cluster_id  = {hcl_value(self.cluster_id)}",
            f"  listen_addr = {hcl_value(self.listen_addr)}",
            "  peers = [",
            ",\n".join(
                f"    {{ id = {hcl_value(peer)}, address = {hcl_value(address)} }}"
                for peer, address in self.peers
            ),
            "  ]",
            f"  auth = {hcl_object(self.auth)}",
        ]
        if self.sync:
            lines.append(f"  sync = {hcl_object(self.sync)}")
        if self.transport:
            lines.append(f"  transport = {hcl_object(self.transport)}")
        lines.append(f"  data = {{ {self.data} }}")
        if self.strategy is not None:
            lines.append(f"  conflict_resolution = {{ strategy = {hcl_value(self.strategy)} }}")
        if self.recovery:
            lines.append(f"  recovery = {hcl_object(self.recovery)}")
        lines.append(f"  control_socket = {hcl_value(self.control_socket)}")
        if self.extra:
            lines.append(self.extra)
        lines.append("}")
        return "\n".join(lines) + "\n"
