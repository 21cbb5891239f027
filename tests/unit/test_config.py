"""Configuration files: the seed documents' blocks load as written; every mistake names the
file and the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from replicator.config import load_config, parse_duration, parse_size
from replicator.errors import ConfigError
from replicator.node import unbuilt_settings

ROOT = Path(__file__).resolve().parents[2]
SEED_BLOCKS = sorted((ROOT / "tests" / "data" / "seed_config").glob("*.hcl"))
EXAMPLES = sorted((ROOT / "conf").rglob("*.hcl"))


@pytest.mark.parametrize("path", SEED_BLOCKS, ids=lambda p: p.name)
def test_every_seed_configuration_block_loads_as_written(path: Path) -> None:
    load_config(path)


def test_seed_replication_block_keeps_its_values() -> None:
    config = load_config(ROOT / "tests" / "data" / "seed_config" / "replication_2.hcl")
    replication = config.replication
    assert replication.mode == "primary"
    assert [(p.id, p.host, p.port, p.role) for p in replication.peers] == [
        ("node2", "192.168.100.2", 9001, "replica"),
        ("node3", "192.168.100.3", 9001, "replica"),
    ]
    assert replication.auth.key_rotation == 86400
    assert replication.sync.max_lag == 10
    assert replication.replicated_tables() == (
        "dhcp_leases",
        "dns_records",
        "learning_flows",
        "learning_suggestions",
        "config_history",
    )


def test_seed_conflict_block_keeps_quoted_priority_keys() -> None:
    config = load_config(ROOT / "tests" / "data" / "seed_config" / "replication_3.hcl")
    conflicts = config.replication.conflict_resolution
    assert conflicts.priorities == {"node1": 100, "node2": 50, "node3": 25}
    assert conflicts.clock_skew_tolerance == pytest.approx(0.1)
    assert conflicts.manual_timeout == 3600


def test_seed_state_block_with_retention_buckets() -> None:
    config = load_config(ROOT / "tests" / "data" / "seed_config" / "state_2.hcl")
    backup = config.state.backup
    assert (backup.retention.hourly, backup.retention.monthly) == (24, 12)
    assert config.state.database.mmap_size == 256_000_000
    assert config.state.persistence["conntrack"] is False


def test_appliance_blocks_are_recognised_not_silently_used() -> None:
    config = load_config(ROOT / "tests" / "data" / "seed_config" / "state_3.hcl")
    assert config.foreign_blocks == ("dhcp", "dns", "rule_learning")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_configs_load_and_name_their_schema(path: Path) -> None:
    config = load_config(path)
    assert config.state.schema == str(ROOT / "conf" / "schema.sql")
    assert config.replication.replicated_tables()
    auth = config.replication.auth
    if path.parent.name == "compose":  # the key is the compose secret, in the container only
        assert auth.secret_key_file == "/run/secrets/replicator_psk"
    else:
        assert auth.passphrases()[0]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.hcl"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('replication {\n  modee = "primary"\n}', "replication.modee: unknown setting"),
        ('replication {\n  mode = "leader"\n}', "replication.mode: 'leader' is not one of"),
        ('replication {\n  sync = { interval = "1x" }\n}', "replication.sync.interval: '1x'"),
        ("replication {\n  sync = { batch_size = 0 }\n}", "replication.sync.batch_size: 0"),
        ('replication {\n  listen_addr = "nowhere"\n}', "replication.listen_addr"),
        (
            'replication {\n  peers = [ { id = "b", address = "h:99999" } ]\n}',
            "replication.peers[0].address",
        ),
        ('replication {\n  peers = [ { address = "h:1" } ]\n}', "replication.peers[0].id"),
        (
            'replication {\n  conflict_resolution = { strategy = "newest" }\n}',
            "replication.conflict_resolution.strategy",
        ),
        (
            'replication {\n  auth = { secret_key = "0123456789abcdef", secret_key_file = "k" }\n}',
            "replication.auth.secret_key_file",
        ),
        ("state {\n  backup { enabled = true }\n}", "state.backup.directory"),
        ('state {\n  backup { retention = "forever" }\n}', "state.backup.retention"),
        (
            'replication {\n  sync = { log_retention = "forever" }\n}',
            "replication.sync.log_retention",
        ),
        (
            'replication {\n  recovery = { full_resync = { schedule = "0 25 * * *" } }\n}',
            "replication.recovery.full_resync.schedule",
        ),
        ('state {\n  database { synchronous = "SOMETIMES" }\n}', "state.database.synchronous"),
        ("state {\n  auto_save = 1\n}", "state.auto_save: expected true or false"),
        ("shards {\n  count = 3\n}", "shards: unknown setting"),
    ],
)
def test_mistakes_name_the_file_and_the_key(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert where in str(caught.value)


def test_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "replication {\n  mode = \n}")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: HCL syntax error")):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.hcl")


def test_secret_is_never_in_the_config_repr(tmp_path: Path) -> None:
    secret = "a very secret passphrase indeed"
    config = load_config(write(tmp_path, f'replication {{\n  secret_key = "{secret}"\n}}'))
    assert secret not in repr(config)
    assert config.replication.auth.passphrases() == (secret, None)


def test_secret_key_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "cluster.psk").write_text("from a file, sixteen chars+\n")
    (tmp_path / "cluster.psk").chmod(0o600)
    config = load_config(
        write(tmp_path, 'replication {\n  auth = { secret_key_file = "cluster.psk" }\n}')
    )
    assert config.replication.auth.passphrases()[0] == "from a file, sixteen chars+"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_key_file_open_to_group_or_others_is_refused_naming_the_key_and_file(
    tmp_path: Path, mode: int
) -> None:
    key = tmp_path / "cluster.psk"
    key.write_text("from a file, sixteen chars+\n")
    key.chmod(mode)
    config = load_config(
        write(tmp_path, 'replication {\n  auth = { secret_key_file = "cluster.psk" }\n}')
    )
    with pytest.raises(ConfigError, match=r"secret_key_file: key file .*cluster\.psk is open"):
        config.replication.auth.passphrases()


def test_running_without_a_secret_says_which_setting(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'replication {\n  node_id = "n1"\n}'))
    with pytest.raises(ConfigError, match=r"replication\.auth\.secret_key"):
        config.replication.auth.passphrases()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("100ms", 0.1), ("1s", 1), ("10m", 600), ("1h", 3600), ("7d", 604800), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64KB", 64_000), ("256MB", 256_000_000), ("1GiB", 1 << 30), (512, 512)],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "10", "1 hour", "-1s", "s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_liveness_timeout_must_exceed_the_heartbeat_interval(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'replication {\n  sync = { heartbeat_interval = "5s", liveness_timeout = "2s" }\n}',
    )
    with pytest.raises(ConfigError, match=r"replication\.sync\.liveness_timeout"):
        load_config(path)


@pytest.mark.parametrize(
    ("block", "named"),
    [
        ('replication {\n  primary_addr = "192.168.100.1:9001"\n}', "primary_addr"),
        ("state {\n  sync { batch_size = 50 }\n}", "state.sync.batch_size"),
        ('state {\n  sync { sync_timeout = "1m" }\n}', "state.sync.sync_timeout"),
        (
            "replication {\n  conflict_resolution = { manual_resolution = "
            '{ approvers = ["ops"] } }\n}',
            "manual_resolution.approvers",
        ),
        ("replication {\n  transformations = { compress_data = false }\n}", "compress_data"),
    ],
)
def test_settings_of_features_not_built_are_named_before_start(
    tmp_path: Path, block: str, named: str
) -> None:
    """Accepted by the loader (the seed blocks must load), but a node refuses to start."""
    config = load_config(write(tmp_path, block))
    assert any(named in setting for setting in unbuilt_settings(config))


def test_the_example_configs_need_nothing_unbuilt() -> None:
    for path in sorted((ROOT / "conf").rglob("*.hcl")):
        assert unbuilt_settings(load_config(path)) == [], path
