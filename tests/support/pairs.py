"""In-memory endpoints for protocol tests: two sessions joined by a perfect link."""

from __future__ import annotations

import os

from protocol import Keyring, Session, SessionSettings
from protocol.session import Event

CLUSTER = "test-cluster"


def random_keyring() -> Keyring:
    return Keyring(os.urandom(32))


def pump(source: Session, target: Session) -> list[Event]:
    """Deliver what ``source`` has queued to ``target``; return ``target``'s events."""
    return target.receive_data(source.data_to_send())


def open_pair(
    keyring: Keyring | None = None,
    settings: SessionSettings | None = None,
    *,
    responder_keyring: Keyring | None = None,
) -> tuple[Session, Session]:
    """A handshaken (initiator, responder) pair, both open."""
    keyring = keyring or random_keyring()
    initiator = Session.initiator(keyring, CLUSTER, settings)
    responder = Session.responder(responder_keyring or keyring, CLUSTER, settings)
    pump(initiator, responder)
    pump(responder, initiator)
    pump(initiator, responder)
    assert initiator.is_open
    assert responder.is_open
    return initiator, responder


def feed_then_close(session: Session, data: bytes) -> list[Event]:
    """Deliver ``data`` followed by end of stream; return every event."""
    return session.receive_data(data) + session.receive_data(b"")
