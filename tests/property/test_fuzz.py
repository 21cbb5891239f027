"""Property tests: whatever bytes arrive, in whatever state, only a ProtocolError escapes, and
no altered byte stream is ever accepted as something the honest sender did not send."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import Goodbye, Heartbeat, ProtocolError, RemoteProtocolError, Session, State
from protocol.codec import Codec, pack
from protocol.messages import MESSAGE_TYPES, decode_message
from tests.support.messages_sample import VECTOR, every_message
from tests.support.pairs import CLUSTER, feed_then_close, open_pair, pump, random_keyring

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _fresh_responder() -> Session:
    return Session.responder(random_keyring(), CLUSTER)


def _initiator_after_message1() -> Session:
    initiator = Session.initiator(random_keyring(), CLUSTER)
    initiator.data_to_send()
    return initiator


def _responder_after_message1() -> Session:
    keyring = random_keyring()
    responder = Session.responder(keyring, CLUSTER)
    pump(Session.initiator(keyring, CLUSTER), responder)
    return responder


def _open_responder() -> Session:
    return open_pair()[1]


def _open_initiator() -> Session:
    return open_pair()[0]


def _sent_goodbye() -> Session:
    initiator, _ = open_pair()
    initiator.send(Goodbye("bye"))
    return initiator


def _received_goodbye() -> Session:
    initiator, responder = open_pair()
    responder.receive_data(initiator.send(Goodbye("bye")))
    return responder


def _closed() -> Session:
    initiator, responder = open_pair()
    responder.receive_data(initiator.send(Goodbye("bye")))
    initiator.receive_data(responder.send(Goodbye("bye")))
    return initiator


def assert_failed_for_good(session: Session) -> None:
    """After any protocol error the session is in ERROR and refuses everything after."""
    assert session.state is State.ERROR
    for attempt in (lambda: session.receive_data(b"\x00"), lambda: session.send(Goodbye("x"))):
        with pytest.raises(ProtocolError, match="already failed"):
            attempt()


STATES: dict[str, Callable[[], Session]] = {
    "awaiting message 1": _fresh_responder,
    "awaiting message 2": _initiator_after_message1,
    "awaiting message 3": _responder_after_message1,
    "open responder": _open_responder,
    "open initiator": _open_initiator,
    "sent goodbye": _sent_goodbye,
    "received goodbye": _received_goodbye,
    "closed": _closed,
}


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@FUZZ
@given(
    state=st.sampled_from(sorted(STATES)),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=6),
    close=st.booleans(),
)
def test_random_bytes_in_any_state_raise_only_protocol_errors(
    state: str, data: bytes, cuts: list[int], close: bool
) -> None:
    session = STATES[state]()
    try:
        for chunk in _chunks(data, cuts):
            session.receive_data(chunk)
        if close:
            session.receive_data(b"")
    except ProtocolError:
        assert_failed_for_good(session)


@FUZZ
@given(
    length=st.integers(min_value=0, max_value=0xFFFFFFFF),
    tail=st.binary(max_size=64),
    state=st.sampled_from(sorted(STATES)),
)
def test_any_length_prefix_raises_only_protocol_errors(
    length: int, tail: bytes, state: str
) -> None:
    session = STATES[state]()
    try:
        feed_then_close(session, length.to_bytes(4, "big") + tail)
    except ProtocolError:
        assert_failed_for_good(session)


@FUZZ
@given(
    position=st.integers(min_value=0),
    replacement=st.integers(min_value=1, max_value=255),
    kind=st.sampled_from(["xor", "insert", "delete"]),
)
def test_altered_stream_never_yields_a_message_that_was_not_sent(
    position: int, replacement: int, kind: str
) -> None:
    keyring = random_keyring()
    initiator = Session.initiator(keyring, CLUSTER)
    responder = Session.responder(keyring, CLUSTER)
    responder.receive_data(initiator.data_to_send())
    initiator.receive_data(responder.data_to_send())
    sent = [Heartbeat(n, VECTOR, {}) for n in range(3)] + [Goodbye("bye")]
    stream = bytearray(initiator.data_to_send() + b"".join(initiator.send(m) for m in sent))
    where = position % len(stream)
    if kind == "xor":
        stream[where] ^= replacement
    elif kind == "insert":
        stream.insert(where, replacement)
    else:
        del stream[where]
    received: list[Any] = []
    try:
        for byte_range in _chunks(bytes(stream), [where, where + 7]):
            received += responder.receive_data(byte_range)
        received += responder.receive_data(b"")
    except RemoteProtocolError:
        assert_failed_for_good(responder)
    else:
        raise AssertionError("an altered stream was accepted in full")
    messages = [event for event in received if type(event) in MESSAGE_TYPES.values()]
    assert messages == sent[: len(messages)]


def _msgpack_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(1 << 64) + 1, max_value=(1 << 64) - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=20)
        | st.binary(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=30,
    )


@FUZZ
@given(message_type=st.sampled_from(sorted(MESSAGE_TYPES)), value=_msgpack_values())
def test_any_decoded_structure_is_checked_or_refused(message_type: int, value: Any) -> None:
    codec = Codec()
    try:
        body = pack(value)
    except ProtocolError:
        return  # not representable in msgpack (integers past 64 bits): nothing to send
    plaintext = bytes([message_type, 0]) + len(body).to_bytes(4, "big") + body
    try:
        message = decode_message(codec, plaintext)
    except RemoteProtocolError:
        return
    assert type(message) is MESSAGE_TYPES[message_type]


@FUZZ
@given(
    message_type=st.sampled_from(sorted(MESSAGE_TYPES)),
    template=st.sampled_from(every_message()),
    position=st.integers(min_value=0),
    replacement=st.integers(min_value=0, max_value=255),
)
def test_corrupted_message_bodies_are_checked_or_refused(
    message_type: int, template: Any, position: int, replacement: int
) -> None:
    """Real message bodies with one byte changed: the checks must hold, whatever it hits."""
    codec = Codec(compress=False)
    body = bytearray(pack(template.to_wire()))
    body[position % len(body)] = replacement
    plaintext = bytes([message_type, 0]) + len(body).to_bytes(4, "big") + bytes(body)
    with contextlib.suppress(RemoteProtocolError):
        decode_message(codec, plaintext)
