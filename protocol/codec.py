"""Plaintext of one sealed frame: a 6-byte header, then an msgpack body, maybe lz4-compressed.

    type (u8) | flags (u8) | raw length (u32, big-endian) | body

``raw length`` is the size of the msgpack body before compression, capped before anything is
allocated; a compressed body must decompress to exactly that size and may not claim more than
`MAX_COMPRESSION_RATIO` times its own size, so a small frame cannot become a large message.
Small bodies are sent uncompressed: lz4 would only add overhead; a body that compresses beyond
the ratio is sent raw, so every honest message is one the receiver accepts.

msgpack is decoded with every length bounded, extension types refused, map keys restricted to
strings and bytes, duplicate map keys refused (two decoders must never read one map two ways),
trailing bytes refused, and the number of decoded elements bounded: a message of one-byte empty
arrays would otherwise cost some sixty bytes of memory per byte received. `protocol.checks`
then pins the exact shape. Nesting depth is bounded by msgpack's own fixed decoder stack and,
below that, by the schema check, which never descends into a structure it did not expect.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import lz4.block
import msgpack

from protocol.errors import LocalProtocolError, MessageTooLarge, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "HEADER_SIZE",
    "MAX_COMPRESSION_RATIO",
    "Codec",
    "pack",
    "unpack_strict",
]

_HEADER = struct.Struct(">BBI")
HEADER_SIZE = _HEADER.size
FLAG_LZ4 = 0x01
_KNOWN_FLAGS = FLAG_LZ4
MAX_COMPRESSION_RATIO = 64
"""A compressed body may expand to at most this many times its size (lz4 itself allows ~255)."""
DEFAULT_MAX_ELEMENTS = 1 << 20
"""Decoded msgpack values (array items, map keys and values) allowed in one body."""


def pack(value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise LocalProtocolError(f"cannot encode message: {error}") from None
    return packed


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


class _ElementBudget:
    """Counts decoded values as msgpack completes each container (the container itself and
    its items: empty ones cost memory too); refuses past the budget."""

    __slots__ = ("left",)

    def __init__(self, elements: int) -> None:
        self.left = elements

    def list_hook(self, items: list[Any]) -> list[Any]:
        self.left -= len(items) + 1
        if self.left < 0:
            raise RemoteProtocolError("message decodes to more elements than allowed")
        return items

    def map_hook(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        mapping = dict(pairs)
        if len(mapping) != len(pairs):
            raise RemoteProtocolError("msgpack map repeats a key")
        self.left -= 2 * len(pairs) + 1
        if self.left < 0:
            raise RemoteProtocolError("message decodes to more elements than allowed")
        return mapping


def unpack_strict(data: bytes, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Any:
    """Decode one msgpack value that must fill ``data`` exactly, with every length bounded."""
    limit = len(data)
    budget = _ElementBudget(max_elements)
    container = min(limit, max_elements)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            object_pairs_hook=budget.map_hook,
            # Every value takes at least one byte: a body no longer than the budget cannot
            # exceed it, so arrays (the hot path) are only counted in longer bodies.
            list_hook=budget.list_hook if limit > max_elements else None,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=container,
            max_map_len=container // 2,
            max_ext_len=0,
        )
    except RemoteProtocolError:
        raise
    except Exception as error:  # msgpack raises many types for bad input; all mean the same
        raise RemoteProtocolError(f"malformed msgpack: {type(error).__name__}: {error}") from None


@dataclass(frozen=True, slots=True)
class Codec:
    """Encodes and decodes message plaintexts under one set of limits."""

    max_message_size: int = 16 << 20
    compress: bool = True
    compress_threshold: int = 512
    max_elements: int = DEFAULT_MAX_ELEMENTS

    def encode(self, message_type: int, value: Any) -> bytes:
        body = pack(value)
        raw_length = len(body)
        if raw_length > self.max_message_size:
            raise MessageTooLarge(
                f"message of {raw_length} bytes exceeds the {self.max_message_size}-byte cap"
            )
        flags = 0
        if self.compress and raw_length >= self.compress_threshold:
            compressed: bytes = lz4.block.compress(body, store_size=False)
            if len(compressed) < raw_length <= len(compressed) * MAX_COMPRESSION_RATIO:
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
        return message_type, unpack_strict(body, max_elements=self.max_elements)


def _decompress_exactly(body: bytes, raw_length: int) -> bytes:
    if raw_length == 0 or raw_length > len(body) * MAX_COMPRESSION_RATIO:
        raise RemoteProtocolError(
            f"lz4 body of {len(body)} bytes may not expand to the declared {raw_length} bytes"
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
