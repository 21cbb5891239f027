#!/usr/bin/env python3
"""Throughput of the wire protocol, next to plain msgpack, so its cost is known in context.

Everything runs in memory in one process: two `protocol.Session` objects joined by their
handshake, one sealing and the other opening. A figure only means something next to the
others of the same run on the same machine, so each is printed with its baseline; nothing is
asserted about speed.

    .venv/bin/python scripts/bench_protocol.py [--batches N] [--handshakes N] [--repeats R]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol import (
    Change,
    Changes,
    Keyring,
    Op,
    Origin,
    RowVersion,
    Session,
    SessionSettings,
)

CLUSTER = "bench"
BATCH_SIZE = 1000
ORIGIN = Origin("node1", 1)
PEER = Origin("node2", 1)
HLC_BASE = 1 << 48  # the magnitude of a real hybrid logical clock reading
EPOCH = 1_750_000_000


@dataclass(frozen=True, slots=True)
class Timing:
    """Rates (units per second) of every repeat of one measurement."""

    rates: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def best(self) -> float:
        return max(self.rates)


def lease_row(rng: random.Random, index: int, expires: int) -> dict[str, Any]:
    """A DHCP lease as the leases table holds it: the column mix the replicator really ships."""
    mac = "02:00:" + ":".join(f"{byte:02x}" for byte in index.to_bytes(4, "big"))
    return {
        "mac": mac,
        "ip": f"10.{(index >> 16) & 0xFF}.{(index >> 8) & 0xFF}.{index & 0xFF}",
        "hostname": f"host-{rng.choice(['pc', 'phone', 'printer', 'cam'])}-{index:06d}",
        "expires": expires,
        "scope": rng.choice(["lan", "guest", "iot"]),
        "client_id": rng.randbytes(16),
    }


def make_batch(rng: random.Random, sequence: int) -> Changes:
    """One batch of lease renewals: UPDATEs with the old row and the version they replace."""
    changes = []
    for offset in range(BATCH_SIZE):
        seq = sequence * BATCH_SIZE + offset + 1
        index = rng.randrange(1 << 20)
        old = lease_row(rng, index, EPOCH + rng.randrange(86_400))
        row = dict(old, expires=old["expires"] + 3600)
        hlc = HLC_BASE + seq * 65_536 + rng.randrange(256)
        changes.append(
            Change(
                origin=ORIGIN,
                seq=seq,
                table="leases",
                op=Op.UPDATE,
                pk=(row["mac"],),
                row=row,
                old=old,
                version=RowVersion(hlc, ORIGIN, 3),
                replaced=RowVersion(hlc - rng.randrange(1 << 30), PEER, 2),
            )
        )
    return Changes(
        node_id=ORIGIN.node_id,
        sequence=sequence + 1,
        timestamp=(EPOCH + sequence) * 1000,
        changes=tuple(changes),
    )


def plain_wire(batch: Changes) -> list[list[Any]]:
    """The same changes as plain lists and dicts, shaped like the protocol's wire arrays."""

    def version(v: RowVersion) -> list[Any]:
        return [v.hlc, v.origin.node_id, v.origin.incarnation, v.generation]

    return [
        [
            c.origin.node_id,
            c.origin.incarnation,
            c.seq,
            c.table,
            int(c.op),
            list(c.pk),
            c.row,
            c.old,
            version(c.version),
            None if c.replaced is None else version(c.replaced),
        ]
        for c in batch.changes
    ]


def open_pair(keyring: Keyring, settings: SessionSettings | None = None) -> tuple[Session, Session]:
    """An initiator and a responder that completed the 3-message handshake in memory."""
    initiator = Session.initiator(keyring, CLUSTER, settings)
    responder = Session.responder(keyring, CLUSTER, settings)
    responder.receive_data(initiator.data_to_send())
    initiator.receive_data(responder.data_to_send())
    responder.receive_data(initiator.data_to_send())
    if not (initiator.is_open and responder.is_open):
        raise SystemExit("handshake did not open both sessions")
    return initiator, responder


def repeat(repeats: int, units: int, body: Callable[[], None]) -> Timing:
    """Run ``body`` (which does ``units`` of work) ``repeats`` times; rates per repeat."""
    rates: list[float] = []
    for _ in range(repeats):
        gc.collect()  # every repeat starts from the same heap, not the previous one's garbage
        start = time.perf_counter()
        body()
        rates.append(units / (time.perf_counter() - start))
    return Timing(rates)


def bench_stack(
    keyring: Keyring, batches: list[Changes], settings: SessionSettings, repeats: int
) -> tuple[Timing, float]:
    """Changes/s for send -> bytes -> receive_data, and wire bytes per change."""
    sender, receiver = open_pair(keyring, settings)
    wire_bytes = 0
    for batch in batches:  # a warm-up pass that also checks the round trip and sizes the frames
        frame = sender.send(batch)
        wire_bytes += len(frame)
        if receiver.receive_data(frame) != [batch]:
            raise SystemExit("a batch did not survive the round trip unchanged")

    def run() -> None:
        for batch in batches:
            receiver.receive_data(sender.send(batch))

    timing = repeat(repeats, len(batches) * BATCH_SIZE, run)
    return timing, wire_bytes / (len(batches) * BATCH_SIZE)


def bench_msgpack(wires: list[list[list[Any]]], repeats: int) -> tuple[Timing, float]:
    """Changes/s for msgpack packb + unpackb of the same changes, and packed bytes per change."""
    size = sum(len(msgpack.packb(wire, use_bin_type=True)) for wire in wires)

    def run() -> None:
        for wire in wires:
            msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)

    timing = repeat(repeats, len(wires) * BATCH_SIZE, run)
    return timing, size / (len(wires) * BATCH_SIZE)


def bench_handshakes(keyring: Keyring, count: int, repeats: int) -> Timing:
    """Full handshakes/s: fresh sessions, three messages, both sides open."""

    def run() -> None:
        for _ in range(count):
            open_pair(keyring)

    return repeat(repeats, count, run)


def versions() -> list[tuple[str, str]]:
    msgpack_kind = "C" if msgpack.Packer.__module__.endswith("_cmsgpack") else "pure Python"
    return [
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("msgpack", f"{importlib.metadata.version('msgpack')} ({msgpack_kind})"),
        ("lz4", importlib.metadata.version("lz4")),
        ("pynacl", importlib.metadata.version("pynacl")),
        ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs"),
    ]


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<44} {value:>12}  {note}".rstrip())


def rate(timing: Timing) -> str:
    return f"{timing.median:,.0f}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", type=int, default=40, help="1,000-change batches per repeat (default 40)"
    )
    parser.add_argument(
        "--handshakes", type=int, default=400, help="handshakes per repeat (default 400)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated leases")
    args = parser.parse_args(argv)
    if min(args.batches, args.handshakes, args.repeats) < 1:
        parser.error("--batches, --handshakes and --repeats must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for name, version in versions():
        print(f"{name:<8} {version}")
    print(
        f"batches: {args.batches} x {BATCH_SIZE:,} changes, {args.handshakes} handshakes, "
        f"median (best) of {args.repeats} repeats\n"
    )

    rng = random.Random(args.seed)
    batches = [make_batch(rng, sequence) for sequence in range(args.batches)]
    wires = [plain_wire(batch) for batch in batches]
    keyring = Keyring(os.urandom(32))
    # The generated batches are live for the whole run; without this every full collection
    # would walk them, and the rates would fall with --batches instead of measuring the codec.
    gc.freeze()

    plain, plain_size = bench_msgpack(wires, args.repeats)
    stack, stack_size = bench_stack(keyring, batches, SessionSettings(), args.repeats)
    raw, raw_size = bench_stack(keyring, batches, SessionSettings(compress=False), args.repeats)
    handshakes = bench_handshakes(keyring, args.handshakes, args.repeats)

    print("changes/s (UPDATE of a DHCP lease row, 1,000 per batch)")
    print("  full stack = send (pack, lz4, seal) -> receive_data (open, lz4, unpack, schema check)")
    row("full stack, lz4 on", rate(stack), f"(best {stack.best:,.0f})")
    row("full stack, lz4 off", rate(raw), f"(best {raw.best:,.0f})")
    row("plain msgpack packb + unpackb", rate(plain), f"(best {plain.best:,.0f})")
    for label, timing in (("on", stack), ("off", raw)):
        ratio = timing.median / plain.median
        row(
            f"ratio full stack (lz4 {label}) / plain msgpack",
            f"{ratio:.3f}",
            f"({1 / ratio:.1f}x slower)",
        )
    print("\nbytes per change")
    row("on the wire, lz4 on", f"{stack_size:.1f}")
    row("on the wire, lz4 off", f"{raw_size:.1f}")
    row("plain msgpack (no frame, header, seal)", f"{plain_size:.1f}")
    print("\nhandshakes/s (fresh initiator + responder, 3 messages)")
    row("full handshake", rate(handshakes), f"(best {handshakes.best:,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
