"""The one error root of the wire protocol.

Every way a connection can go wrong ends in a `ProtocolError`, so the I/O layer needs a single
``except`` to drop a broken or hostile peer and keep serving the others. The subtype says whose
fault it was: `RemoteProtocolError` for bytes the peer sent, `LocalProtocolError` for a call our
own code should not have made (sending before the handshake, after goodbye...).
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "MessageTooLarge", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """The connection cannot continue; the session is now in its sticky error state."""


class LocalProtocolError(ProtocolError):
    """Our side broke the protocol's rules (a bug in the caller, never the peer's doing)."""


class MessageTooLarge(LocalProtocolError):
    """The message would exceed the message or frame cap; nothing was sent and the session is
    intact, so the caller can cut it smaller."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something we refuse: malformed, oversized, forged, replayed or truncated.

    The message is for our own logs only. Nothing about the reason is ever sent back, so a
    prober learns nothing (no error oracle).
    """
