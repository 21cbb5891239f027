"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes.

The length is checked against the cap as soon as its four bytes are in, before any of the body
is buffered, so a peer cannot make us allocate more than one capped frame. The decoder accepts
data in chunks of any size, split anywhere.
"""

from __future__ import annotations

import struct

from protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["HEADER_SIZE", "MAX_FRAME_SIZE_LIMIT", "FrameDecoder", "encode_frame", "frame_header"]

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
# The largest cap a caller may configure: a length prefix of 0xFFFFFFFF is never honoured.
MAX_FRAME_SIZE_LIMIT = 1 << 30


def frame_header(length: int) -> bytes:
    """The four header bytes for a body of ``length``; also the AEAD associated data."""
    return _HEADER.pack(length)


def encode_frame(payload: bytes, max_frame_size: int) -> bytes:
    if not 0 < len(payload) <= max_frame_size:
        raise LocalProtocolError(
            f"frame of {len(payload)} bytes is outside 1..{max_frame_size} bytes"
        )
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Buffers bytes and yields whole frame bodies; ``feed(b"")`` marks end of stream."""

    __slots__ = ("_buffer", "_eof", "_expected", "max_frame_size", "min_frame_size")

    def __init__(self, max_frame_size: int, min_frame_size: int = 1) -> None:
        _check_bounds(min_frame_size, max_frame_size)
        self.max_frame_size = max_frame_size
        self.min_frame_size = min_frame_size
        self._buffer = bytearray()
        self._expected: int | None = None
        self._eof = False

    def set_bounds(self, min_frame_size: int, max_frame_size: int) -> None:
        """Change the accepted frame sizes (tight during the handshake, wider after)."""
        _check_bounds(min_frame_size, max_frame_size)
        self.min_frame_size = min_frame_size
        self.max_frame_size = max_frame_size

    @property
    def at_eof(self) -> bool:
        """True once end of stream was fed and every whole frame has been taken."""
        return self._eof and not self._buffer

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def pending_frame_size(self) -> int:
        """Header and body size of the frame being buffered (0: its header is not in yet)."""
        return 0 if self._expected is None else HEADER_SIZE + self._expected

    def feed(self, data: bytes) -> None:
        if self._eof:
            if data:
                raise LocalProtocolError("data fed after end of stream")
            return
        if not data:
            self._eof = True
            return
        self._buffer += data
        self._check_pending_header()

    def next_frame(self) -> bytes | None:
        """The next whole frame body, or None when more bytes are needed.

        Raises `RemoteProtocolError` for a length outside the bounds, or when the stream ended
        in the middle of a frame.
        """
        self._check_pending_header()
        expected = self._expected
        if expected is not None and len(self._buffer) >= HEADER_SIZE + expected:
            body = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + expected])
            del self._buffer[: HEADER_SIZE + expected]
            # The next header is checked on the next call, after the caller has had a chance
            # to change the bounds (the handshake's last frame switches to data-frame bounds).
            self._expected = None
            return body
        if self._eof and self._buffer:
            wanted = "a length prefix" if expected is None else f"a {expected}-byte frame"
            raise RemoteProtocolError(f"stream ended {len(self._buffer)} bytes into {wanted}")
        return None

    def _check_pending_header(self) -> None:
        if self._expected is not None or len(self._buffer) < HEADER_SIZE:
            return
        (length,) = _HEADER.unpack_from(self._buffer)
        if length < self.min_frame_size:
            raise RemoteProtocolError(
                f"frame length {length} is below the minimum of {self.min_frame_size} bytes"
            )
        if length > self.max_frame_size:
            raise RemoteProtocolError(
                f"frame length {length} exceeds the cap of {self.max_frame_size} bytes"
            )
        self._expected = length


def _check_bounds(min_frame_size: int, max_frame_size: int) -> None:
    if not 1 <= min_frame_size <= max_frame_size <= MAX_FRAME_SIZE_LIMIT:
        raise ValueError(
            f"frame bounds {min_frame_size}..{max_frame_size} must lie within "
            f"1..{MAX_FRAME_SIZE_LIMIT}"
        )
