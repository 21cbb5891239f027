#!/usr/bin/env python3
"""Coverage-guided fuzzing of everything in `protocol` that reads bytes from a peer.

The protocol promises that no input, however hostile, does anything but raise `ProtocolError`
(and leave the session failed for good). This harness holds it to that: a `ProtocolError` is
the expected outcome and is swallowed, anything else escapes and libFuzzer reports the input.
A few properties are checked as well (sticky errors, frame bounds, re-encoding is stable);
their violations are raised as `AssertionError`.

atheris is not a project dependency; install it into the virtualenv first:

    .venv/bin/pip install atheris && .venv/bin/python scripts/fuzz_protocol.py -max_total_time=300

Any libFuzzer flag works (``-jobs=2``, a corpus directory to keep what was found, or a crash
file to replay it). Random bytes rarely form a valid msgpack message, so start from seeds:

    .venv/bin/python scripts/fuzz_protocol.py --write-seeds corpus/   # one valid input per case
    .venv/bin/python scripts/fuzz_protocol.py corpus/ -max_total_time=300

The first input byte picks the target:

    0  a fresh responder's ``receive_data`` (handshake message 1 and what follows)
    1  an initiator that sent message 1 (handshake message 2 and what follows)
    2  a responder that completed the handshake: raw bytes where sealed frames belong
    3  ``Codec().decode`` then ``decode_message``: a message plaintext after opening
    4  a ``FrameDecoder`` with bounds and chunking taken from the input
    5  an open responder fed plaintexts sealed with its peer's real stream key, i.e. an
       authenticated but hostile node; random bytes (target 2) never get past the AEAD
    6  a ``Changes`` body with a valid checksum, which random bytes never match either

For the session targets the next byte sets how the rest is split into ``receive_data`` calls
(low 7 bits: chunk size, 0 = all at once; high bit: end of stream afterwards).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

try:
    import atheris
except ImportError as error:
    print(
        f"scripts/fuzz_protocol.py needs atheris, which is not a project dependency ({error}).\n"
        "Install it with: .venv/bin/pip install atheris",
        file=sys.stderr,
    )
    sys.exit(2)

with atheris.instrument_imports(include=["protocol"]):
    from protocol import (
        PROTOCOL_VERSION,
        Ack,
        Change,
        Goodbye,
        Heartbeat,
        Hello,
        Keyring,
        LocalProtocolError,
        Op,
        Origin,
        ProtocolError,
        Resend,
        RowVersion,
        SnapshotBegin,
        SnapshotChunk,
        SnapshotEnd,
        SnapshotRequest,
        SnapshotRow,
        SnapshotTable,
    )
    from protocol.codec import Codec
    from protocol.crypto import (
        STREAM_OVERHEAD,
        TAG_FINAL,
        TAG_MESSAGE,
        TAG_REKEY,
        InitiatorHandshake,
        StreamSender,
    )
    from protocol.framing import HEADER_SIZE, MAX_FRAME_SIZE_LIMIT, FrameDecoder, frame_header
    from protocol.messages import Changes, Message, body_checksum, decode_message, encode_message
    from protocol.session import Session, State

CLUSTER = "fuzz"
# A fixed key, so a crash input replays the same way in a later run (ephemeral keys still vary).
KEYRING = Keyring(hashlib.sha256(b"replicator fuzz key").digest())
CODEC = Codec()
TAG_PUSH = 1  # secretstream's fourth tag, which the protocol never uses: must be refused
TAGS = (TAG_MESSAGE, TAG_PUSH, TAG_REKEY, TAG_FINAL)


def frame(payload: bytes) -> bytes:
    return frame_header(len(payload)) + payload


def feed(session: Session, data: bytes) -> None:
    """Deliver ``data[1:]`` in the chunks ``data[0]`` asks for; a failure must be sticky."""
    if not data:
        return
    control, stream = data[0], data[1:]
    size = control & 0x7F or max(len(stream), 1)
    try:
        for start in range(0, len(stream), size):
            session.receive_data(stream[start : start + size])
        if control & 0x80:
            session.receive_data(b"")
    except ProtocolError:
        check_failed(session)


def check_failed(session: Session) -> None:
    """After a `ProtocolError` the session is in ERROR and refuses everything."""
    if session.state is not State.ERROR:
        raise AssertionError(f"session left in {session.state} after a protocol error")
    try:
        session.receive_data(b"\x00")
    except LocalProtocolError:
        return
    raise AssertionError("a failed session accepted more data")


def check_reencodes(message: Message) -> None:
    """A message we accepted must encode again, and decode to a message that encodes the same.

    Byte equality rather than ``==``, so a NaN in a row does not count as a difference.
    """
    first = encode_message(CODEC, message)
    again = encode_message(CODEC, decode_message(CODEC, first))
    if first != again:
        raise AssertionError(f"re-encoding {type(message).__name__} is not stable")


def open_responder() -> tuple[Session, StreamSender]:
    """A responder in OPEN, and the stream sender of the initiator it shook hands with.

    Built per input because errors are sticky and the stream state advances with every frame;
    the initiator is driven at the handshake level so its sender can seal arbitrary plaintexts.
    """
    handshake = InitiatorHandshake(KEYRING, CLUSTER)
    responder = Session.responder(KEYRING, CLUSTER)
    responder.receive_data(frame(handshake.message1()))
    message2 = responder.data_to_send()[HEADER_SIZE:]
    responder.receive_data(frame(handshake.read_message2(message2)))
    if not responder.is_open or handshake.sender is None:
        raise AssertionError("the in-memory handshake did not open the responder")
    return responder, handshake.sender


def target_responder(data: bytes) -> None:
    feed(Session.responder(KEYRING, CLUSTER), data)


def target_initiator(data: bytes) -> None:
    initiator = Session.initiator(KEYRING, CLUSTER)
    initiator.data_to_send()  # message 1 is "sent"; the input plays the responder
    feed(initiator, data)


def target_open_raw(data: bytes) -> None:
    responder, _ = open_responder()
    feed(responder, data)


def target_open_sealed(data: bytes) -> None:
    """After the chunking byte, records of tag selector (1 byte), length (2 bytes), plaintext."""
    if not data:
        return
    control, records = data[0], data[1:]
    responder, sender = open_responder()
    stream = bytearray()
    position = 0
    while position + 3 <= len(records):
        tag = TAGS[records[position] % len(TAGS)]
        length = int.from_bytes(records[position + 1 : position + 3], "big")
        plaintext = records[position + 3 : position + 3 + length]
        position += 3 + length
        header = frame_header(len(plaintext) + STREAM_OVERHEAD)
        stream += header + sender.seal(plaintext, header, tag)
    feed(responder, bytes([control]) + stream)


def target_codec(data: bytes) -> None:
    try:
        CODEC.decode(data)
        message = decode_message(CODEC, data)
    except ProtocolError:
        return
    check_reencodes(message)


def target_changes_body(data: bytes) -> None:
    wire = [PROTOCOL_VERSION, "fuzz", 1, 0, body_checksum(data), data]
    try:
        message = Changes.from_wire(wire)
    except ProtocolError:
        return
    check_reencodes(message)


def target_frames(data: bytes) -> None:
    """Bounds from the first bytes; every frame must respect them and account for every byte."""
    if len(data) < 3:
        return
    low = 1 + data[0] % 64
    high = MAX_FRAME_SIZE_LIMIT if data[1] == 0xFF else low + data[1]
    control, stream = data[2], data[3:]
    decoder = FrameDecoder(max_frame_size=high, min_frame_size=low)
    size = control & 0x7F or max(len(stream), 1)
    taken = 0
    try:
        for start in range(0, len(stream), size):
            decoder.feed(stream[start : start + size])
            while (body := decoder.next_frame()) is not None:
                if not low <= len(body) <= high:
                    raise AssertionError(f"frame of {len(body)} bytes outside {low}..{high}")
                taken += HEADER_SIZE + len(body)
        if control & 0x80:
            decoder.feed(b"")
            if decoder.next_frame() is not None or not decoder.at_eof:
                raise AssertionError("bytes left over at end of stream without an error")
    except ProtocolError:
        return
    if taken + decoder.buffered != len(stream):
        raise AssertionError(f"{taken} + {decoder.buffered} bytes accounted, {len(stream)} fed")


TARGETS: tuple[Callable[[bytes], None], ...] = (
    target_responder,
    target_initiator,
    target_open_raw,
    target_codec,
    target_frames,
    target_open_sealed,
    target_changes_body,
)


def TestOneInput(data: bytes) -> None:
    """The first byte picks the target (see the module docstring); the rest is its input."""
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])


def sample_messages() -> list[Message]:
    """One valid message of every type; the lease batch is big enough to be compressed."""
    origin = Origin("node1", 1)
    version = RowVersion(1 << 48, origin, 1)
    vector = {origin: 7, Origin("node2", 3): 1}
    row: dict[str, int | float | str | bytes | None] = {
        "mac": "02:00:00:00:00:01",
        "expires": 1_750_000_000,
        "weight": 0.5,
        "client_id": bytes(16),
        "note": None,
    }
    changes = tuple(
        Change(origin, seq, "leases", Op.UPDATE, (f"02:00:00:00:00:{seq:02x}",), row, row, version)
        for seq in range(1, 9)
    )
    return [
        Hello("node1", 1, frozenset({"snapshot"}), 1, b"\x01" * 32, vector),
        Changes("node1", 1, 1_750_000_000_000, changes),
        Ack(vector, 1),
        Heartbeat(1_750_000_000_000, vector, {"leases": bytes(16)}),
        Goodbye("shutdown"),
        SnapshotBegin(1, vector, (SnapshotTable("leases", ("mac", "ip"), ("mac",), 1),)),
        SnapshotChunk(1, "leases", 0, (SnapshotRow(("02:00:00:00:00:01",), row, version),)),
        SnapshotEnd(1, {"leases": bytes(16)}, 1),
        Resend(vector),
        SnapshotRequest(("leases",), "checksum mismatch"),
    ]


def record(tag: int, plaintext: bytes) -> bytes:
    """One record of `target_open_sealed`'s input."""
    return bytes([TAGS.index(tag)]) + len(plaintext).to_bytes(2, "big") + plaintext


def seeds() -> list[bytes]:
    """Valid inputs for every target, so the fuzzer mutates messages instead of noise."""
    message1 = frame(InitiatorHandshake(KEYRING, CLUSTER).message1())
    messages = sample_messages()
    plaintexts = [encode_message(CODEC, message) for message in messages]
    body = next(m for m in messages if isinstance(m, Changes)).to_wire()[5]
    goodbye = encode_message(CODEC, Goodbye("done"))
    found = [
        b"\x00\x00" + message1,
        b"\x00\x85" + message1,
        b"\x01\x00" + frame(bytes(72)),
        b"\x02\x00" + frame(bytes(40)),
        b"\x04\x08\x20\x03" + frame(b"x" * 10) * 2,
        b"\x04\x01\xff\x80" + frame(b"y") + b"\x00",
        b"\x06" + body,
    ]
    for plaintext in plaintexts:
        found.append(b"\x03" + plaintext)
        found.append(b"\x05\x00" + record(TAG_MESSAGE, plaintext) + record(TAG_FINAL, goodbye))
    return found


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        directory = Path(sys.argv[2])
        directory.mkdir(parents=True, exist_ok=True)
        for number, seed in enumerate(seeds()):
            (directory / f"seed-{number:02d}").write_bytes(seed)
        print(f"wrote {number + 1} seeds to {directory}")
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
