"""Which wrong rows a repair request names (the peer then sends just those) and which tables
fall back to buckets: a request the peer would refuse, or one past a message, names none."""

from __future__ import annotations

from protocol import MAX_REPAIR_KEYS
from protocol.checks import MAX_TEXT_LENGTH
from replicator.node.divergence_watch import _nameable


def test_a_few_short_keys_are_named() -> None:
    wrong = {"leases": ("'m1'", "'m2'"), "records": ("'a','b','A'",)}
    assert _nameable(wrong) == wrong


def test_too_many_rows_or_too_long_a_key_fall_back_to_buckets() -> None:
    many = tuple(f"{n}" for n in range(MAX_REPAIR_KEYS + 1))
    long = ("'" + "x" * MAX_TEXT_LENGTH + "'",)
    named = _nameable({"many": many, "long": long, "few": ("'m1'",)})
    assert named == {"few": ("'m1'",)}


def test_the_keys_named_together_stay_well_inside_a_message() -> None:
    big = tuple(f"'{n:0>3000}'" for n in range(300))  # about 0.9 MB of key text per table
    named = _nameable({"a": big, "b": big, "c": big})
    assert list(named) == ["a"]  # the others would pass 1 MiB: repaired by bucket
