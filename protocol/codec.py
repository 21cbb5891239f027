"""Plaintext of one sealed frame: a 6-byte header, then an msgpack body, maybe lz4-compressed.

    type (u8) | flags (u8) | raw length (u32, big-endian) | body

``raw length`` is the size of the msgpack body before compression, capped before anything is
allocated; a compressed body must decompress to exactly that size, so a peer cannot lie its way
to a decompression bomb. Small bodies are sent uncompressed: lz4 would only add overhead.
msgpack is decoded with every length bounded, extension types refused, map keys restricted to
strings and bytes, and trailing bytes refused; `protocol.checks` then pins the exact shape.
Nesting depth is bounded by msgpack's own fixed decoder stack and, below that, by the schema
check, which never descends into a structure it did not expect.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import lz4.block
import msgpack

from protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["HEADER_SIZE", "Codec", "pack", "unpack_strict"]

_HEADER = struct.Struct(">BBI")
HEADER_SIZE = _HEADER.size
FLAG_LZ4 = 0x01
_KNOWN_FLAGS = FLAG_LZ4
# lz4 cannot expand data by more than ~255:1; a claimed ratio above this is a lie.
_LZ4_MAX_RATIO = 255
_MAX_CONTAINER_LEN = 1 << 20


def pack(value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise LocalProtocolError(f"cannot encode message: {error}") from None
    return packed


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


def unpack_strict(data: bytes) -> Any:
    """Decode one msgpack value that must fill ``data`` exactly, with every length bounded."""
    limit = len(data)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=min(limit, _MAX_CONTAINER_LEN),
            max_map_len=min(limit // 2, _MAX_CONTAINER_LEN),
            max_ext_len=0,
        )
    except RemoteProtocolError:
        raise
    except Exception as error:  # msgpack raises many types for bad input; all mean the same
        raise RemoteProtocolError(f"malformed msgpack: {type(error).__name__}: {error}") from None


@dataclass(frozen=True, slots=True)
class Codec:
    """Encodes and decodes message plaintexts under one set of limits."""

    max_message_size: int = 64 << 20
    compress: bool = True
    compress_threshold: int = 512

    def encode(self, message_type: int, value: Any) -> bytes:
        body = pack(value)
        raw_length = len(body)
        if raw_length > self.max_message_size:
            raise LocalProtocolError(
                f"message of {raw_length} bytes exceeds the {self.max_message_size}-byte cap"
            )
        flags = 0
        if self.compress and raw_length >= self.compress_threshold:
            compressed: bytes = lz4.block.compress(body, store_size=False)
            if len(compressed) < raw_length:
                body, flags = compressed, FLAG_LZ4
        return _HEADER.pack(message_type, flags, raw_length) + body

    def decode(self, plaintext: bytes) -> tuple[int, Any]:
        """The message type and its decoded (not yet schema-checked) msgpack value."""
        if len(plaintext) < HEADER_SIZE:
            raise RemoteProtocolError(f"message of {len(plaintext)} bytes has no header")
        message_type, flags, raw_length = _HEADER.unpack_from(plaintext)
        body = plaintext[HEADER_SIZE:]
        if flags & ~_KNOWN_FLAGS:
            raise RemoteProtocolError(f"unknown message flags 0x{flags:02x}")
        if raw_length > self.max_message_size:
            raise RemoteProtocolError(
                f"declared size {raw_length} exceeds the {self.max_message_size}-byte cap"
            )
        if flags & FLAG_LZ4:
            body = _decompress_exactly(body, raw_length)
        elif len(body) != raw_length:
            raise RemoteProtocolError(
                f"body has {len(body)} bytes but its header declares {raw_length}"
            )
        return message_type, unpack_strict(body)


def _decompress_exactly(body: bytes, raw_length: int) -> bytes:
    if raw_length == 0 or raw_length > len(body) * _LZ4_MAX_RATIO + 16:
        raise RemoteProtocolError(
            f"lz4 body of {len(body)} bytes cannot expand to the declared {raw_length} bytes"
        )
    try:
        raw: bytes = lz4.block.decompress(body, uncompressed_size=raw_length)
    except Exception as error:  # LZ4BlockError is not importable as a stable name
        raise RemoteProtocolError(f"corrupt lz4 body: {error}") from None
    if len(raw) != raw_length:
        raise RemoteProtocolError(
            f"lz4 body decompressed to {len(raw)} bytes, header declared {raw_length}"
        )
    return raw
