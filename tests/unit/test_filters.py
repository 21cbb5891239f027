"""Filters and transformations: which rows and columns leave a node, and how they look."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol import Change, Op, Origin, RowVersion
from replicator.capture.store import Store, StoreSettings
from replicator.config import load_config
from replicator.errors import ConfigError
from replicator.harness import SCHEMA
from replicator.sync.filters import RowFilter

ORIGIN = Origin("node1", 1)


def row_filter(tmp_path: Path, filters: str, transformations: str = "") -> RowFilter:
    config_path = tmp_path / "node.hcl"
    config_path.write_text(
        f"""
replication {{
  node_id = "node1"
  auth = {{ secret_key = "a passphrase of 16+ chars" }}
  data = {{ dhcp_leases = true, dns_records = true }}
  filters = {{ {filters} }}
  transformations = {{ {transformations} }}
}}
"""
    )
    config = load_config(config_path)
    settings = StoreSettings(str(tmp_path / "s.db"), "node1", ("dhcp_leases", "dns_records"),
                             schema_sql=SCHEMA)  # fmt: skip
    store = Store.open(settings)
    try:
        return RowFilter(config.replication, store.tables, store.conn, b"k", str(config_path))
    finally:
        store.close()


def lease(scope: str = "lan", ip: str = "10.0.0.1", **extra: object) -> dict[str, object]:
    return {"mac": "02:00:00:00:00:01", "ip": ip, "hostname": "printer", "scope": scope,
            "expires": 1, "client_id": b"\x01", **extra}  # fmt: skip


def change(op: Op, row: dict[str, object] | None, old: dict[str, object] | None) -> Change:
    return Change(ORIGIN, 5, "dhcp_leases", op, ("02:00:00:00:00:01",), row, old,  # type: ignore[arg-type]
                  RowVersion(1 << 20, ORIGIN, 2), None)  # fmt: skip


def test_the_seed_custom_filters_are_prepared_against_their_tables(tmp_path: Path) -> None:
    seed = """custom_filters = [ { type = "dhcp", condition = "scope != 'test'" },
                                 { type = "dns", condition = "ttl > 60" } ]"""
    view = row_filter(tmp_path, seed)
    assert view.shares("dhcp_leases", lease("lan"))
    assert not view.shares("dhcp_leases", lease("test"))
    assert view.shares("dns_records", {"name": "a", "type": "A", "zone": "z", "value": "v",
                                       "ttl": 300})  # fmt: skip
    assert not view.shares("dns_records", {"name": "a", "type": "A", "zone": "z", "value": "v",
                                           "ttl": 30})  # fmt: skip


@pytest.mark.parametrize(
    ("condition", "complaint"),
    [("colour = 'red'", "no such column: colour"), ("scope !=", "syntax error")],
)
def test_an_invalid_condition_is_refused_with_its_place(
    tmp_path: Path, condition: str, complaint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        row_filter(tmp_path, f'custom_filters = [ {{ type = "dhcp", condition = "{condition}" }} ]')
    message = str(caught.value)
    assert "replication.filters.custom_filters[0].condition" in message
    assert condition in message
    assert complaint in message


def test_a_filter_type_that_names_no_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"custom_filters\[0\].type: 'firewall'"):
        row_filter(tmp_path, 'custom_filters = [ { type = "firewall", condition = "1" } ]')


def test_changes_follow_whether_their_row_is_shared(tmp_path: Path) -> None:
    view = row_filter(
        tmp_path, 'custom_filters = [ { type = "dhcp", condition = "scope != \'test\'" } ]'
    )
    assert view.outgoing(change(Op.INSERT, lease("test"), None)) is None
    assert view.outgoing(change(Op.INSERT, lease("lan"), None)) is not None
    assert view.outgoing(change(Op.DELETE, None, lease("test"))) is None
    # A shared row moved out of the filter: peers that had it drop it.
    moved = view.outgoing(change(Op.UPDATE, lease("test"), lease("lan")))
    assert moved is not None
    assert (moved.op, moved.row, moved.version) == (Op.DELETE, None, RowVersion(1 << 20, ORIGIN, 2))
    # Moved into the filter: peers get it.
    joined = view.outgoing(change(Op.UPDATE, lease("lan"), lease("test")))
    assert joined is not None
    assert joined.op is Op.UPDATE


def test_zones_keep_rows_of_other_zones_home(tmp_path: Path) -> None:
    view = row_filter(tmp_path, 'zones = ["wan", "lan"], zone_column = "scope"')
    assert view.shares("dhcp_leases", lease("lan"))
    assert not view.shares("dhcp_leases", lease("dmz"))


def test_sensitive_columns_stay_home(tmp_path: Path) -> None:
    view = row_filter(
        tmp_path,
        'exclude_sensitive = true, sensitive_columns = ["dhcp_leases.client_id", "*.hostname"]',
    )
    sent = view.outgoing(change(Op.INSERT, lease(), None))
    assert sent is not None
    assert sent.row is not None
    assert set(sent.row) == {"mac", "ip", "scope", "expires"}


def test_ip_addresses_are_replaced_by_a_stable_keyed_hash(tmp_path: Path) -> None:
    view = row_filter(tmp_path, "", "anonymize_ips = true")
    shown = view.transform(
        "dhcp_leases", lease(ip="10.1.2.3", hostname="host 192.168.0.7 / fe80::1")
    )
    assert shown["ip"] != "10.1.2.3"
    assert str(shown["ip"]).startswith("ip-")
    assert "192.168.0.7" not in str(shown["hostname"])
    assert "fe80::1" not in str(shown["hostname"])
    assert shown["mac"] == "02:00:00:00:00:01"  # a MAC address is not an IP address
    assert view.transform("dhcp_leases", shown) == shown  # the view of the view is the view
    again = view.copy().transform("dhcp_leases", lease(ip="10.1.2.3"))
    assert again["ip"] == shown["ip"]  # stable
    (tmp_path / "other").mkdir()
    other = row_filter(tmp_path / "other", "", "anonymize_ips = true")  # another node, same key
    assert other.transform("dhcp_leases", lease(ip="10.1.2.3"))["ip"] == shown["ip"]


def test_transformations_the_transport_always_does_are_accepted(tmp_path: Path) -> None:
    view = row_filter(tmp_path, "", "compress_data = true, encrypt_data = true")
    assert not view.active
