"""The backup file format: the header, the lz4 and SecretBox streams a copy passes through in
bounded blocks, the metadata sidecar (`BackupInfo`) and the key that opens encrypted backups.

File format (``<name>.backup``)::

    header   magic b"RPLBKUP\\0" | format version (u8, 1) | flags (u8) | file id (16 bytes)
    body     flags & 2 (encrypted): records until the final one, each
                 length (u32 big endian) | SecretBox(nonce + MAC + plaintext)
                 plaintext = file id (16) | chunk index (u64 BE) | final (u8) | <= 1 MiB of data
             else: the stream itself
    stream   flags & 1 (compressed): one lz4 frame (content checksum on) of the SQLite file;
             else the SQLite file as is

The file id, chunk index and final flag are authenticated inside each record, so records
spliced from another backup, reordered, dropped or cut off are all detected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

import lz4.frame
import nacl.exceptions
import nacl.secret

from replicator.errors import ReplicationError

__all__ = [
    "CHUNK",
    "FLAG_COMPRESSED",
    "FLAG_ENCRYPTED",
    "FORMAT",
    "HEADER",
    "MAGIC",
    "RECORD_LENGTH",
    "BackupCorrupt",
    "BackupError",
    "BackupInfo",
    "BackupKeyError",
    "Compressor",
    "Encryptor",
    "HashingWriter",
    "Sink",
    "decompress",
    "decrypt",
    "load_key",
    "read_blocks",
]

MAGIC = b"RPLBKUP\x00"
FORMAT = 1
FLAG_COMPRESSED = 1
FLAG_ENCRYPTED = 2
HEADER = struct.Struct(">8sBB16s")
RECORD_LENGTH = struct.Struct(">I")
CHUNK_PREFIX = struct.Struct(">16sQB")
CHUNK = 1 << 20
MAX_RECORD = CHUNK_PREFIX.size + CHUNK + nacl.secret.SecretBox.NONCE_SIZE + 16
MIN_PASSPHRASE = 16
KEY_PERSON = b"replicator-bkup"


class BackupError(ReplicationError):
    """A backup could not be made, read or restored; the message names the file."""


class BackupCorrupt(BackupError):
    """A backup fails its checksum, is cut short, cannot be decrypted or is no valid database."""


class BackupKeyError(BackupError):
    """The encryption key file is missing, too open, or holds too short a passphrase."""


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """What a backup holds, as its metadata sidecar records it (read from the copy itself)."""

    name: str
    node_id: str
    created_at: float
    size: int
    database_bytes: int
    checksum: str
    description: str | None
    schema_version: int
    replicator_schema: int
    vector: dict[str, int]
    compressed: bool
    encrypted: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> BackupInfo:
        """Parse a metadata sidecar, checking every field's type (it is a file anyone can edit)."""
        if not isinstance(data, dict):
            raise TypeError("metadata is not an object")
        values: dict[str, Any] = {}
        for name, kinds in _FIELD_TYPES.items():
            value = data[name]
            if type(value) not in kinds:
                raise TypeError(f"{name} is {value!r}")
            values[name] = value
        vector = values["vector"]
        if not all(isinstance(k, str) and type(v) is int for k, v in vector.items()):
            raise TypeError(f"vector is {vector!r}")
        values["created_at"] = float(values["created_at"])
        return cls(**values)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "node_id": (str,),
    "created_at": (int, float),
    "size": (int,),
    "database_bytes": (int,),
    "checksum": (str,),
    "description": (str, type(None)),
    "schema_version": (int,),
    "replicator_schema": (int,),
    "vector": (dict,),
    "compressed": (bool,),
    "encrypted": (bool,),
}


def load_key(path: str) -> bytes:
    """32-byte SecretBox key derived (BLAKE2b, digest 32, a fixed `person`) from the passphrase
    text in the file (the format `replicator keygen` writes; strip whitespace; >= 16 chars).
    Refuses a file whose mode lets group or others read or write it: a key others can read
    protects nothing, and one others can write lets them choose it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackupKeyError(
            f"backup key file {path} does not exist",
            op="backup",
            hint=f"create one with `replicator keygen {path}`",
        ) from None
    except OSError as error:
        raise BackupKeyError(
            f"cannot read backup key file {path}: {error.strerror}", op="backup"
        ) from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BackupKeyError(f"backup key file {path} is not a regular file", op="backup")
        if info.st_mode & 0o077:
            raise BackupKeyError(
                f"backup key file {path} is open to group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o})",
                op="backup",
                hint=f"chmod 600 {path}",
            )
        raw = file.read(4097)
    try:
        passphrase = raw.decode().strip()
    except UnicodeDecodeError:
        raise BackupKeyError(f"backup key file {path} is not text", op="backup") from None
    if len(raw) > 4096 or len(passphrase) < MIN_PASSPHRASE:
        raise BackupKeyError(
            f"backup key file {path} must hold a passphrase of {MIN_PASSPHRASE} to 4096 "
            f"characters (it holds {len(passphrase)})",
            op="backup",
            hint=f"create one with `replicator keygen {path}`",
        )
    return hashlib.blake2b(passphrase.encode(), digest_size=32, person=KEY_PERSON).digest()


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class HashingWriter:
    """The end of the chain: writes to the file, checksumming exactly the bytes stored."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.hash = hashlib.blake2b(digest_size=32)
        self.size = 0

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.file.write(data)
        self.size += len(data)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())


class Encryptor:
    """Cuts the stream into chunks of CHUNK bytes, each sealed with its place in the file."""

    def __init__(self, box: nacl.secret.SecretBox, file_id: bytes, sink: Sink) -> None:
        self.box = box
        self.file_id = file_id
        self.sink = sink
        self.buffer = bytearray()
        self.index = 0

    def write(self, data: bytes) -> None:
        self.buffer += data
        # Strictly more than a chunk: whatever is left at close is the final chunk (maybe empty).
        while len(self.buffer) > CHUNK:
            self._seal(bytes(self.buffer[:CHUNK]), final=False)
            del self.buffer[:CHUNK]

    def close(self) -> None:
        self._seal(bytes(self.buffer), final=True)
        self.buffer.clear()
        self.sink.close()

    def _seal(self, chunk: bytes, *, final: bool) -> None:
        sealed = self.box.encrypt(CHUNK_PREFIX.pack(self.file_id, self.index, final) + chunk)
        self.sink.write(RECORD_LENGTH.pack(len(sealed)) + bytes(sealed))
        self.index += 1


class Compressor:
    def __init__(self, level: int, sink: Sink) -> None:
        self.compressor = lz4.frame.LZ4FrameCompressor(
            compression_level=level, content_checksum=True
        )
        self.sink = sink
        self.sink.write(self.compressor.begin())

    def write(self, data: bytes) -> None:
        out = self.compressor.compress(data)
        if out:
            self.sink.write(out)

    def close(self) -> None:
        self.sink.write(self.compressor.flush())
        self.sink.close()


def read_blocks(file: IO[bytes], size: int = CHUNK) -> Iterator[bytes]:
    while block := file.read(size):
        yield block


def decrypt(
    file: IO[bytes], box: nacl.secret.SecretBox, file_id: bytes, where: str
) -> Iterator[bytes]:
    for index in itertools.count():
        head = file.read(RECORD_LENGTH.size)
        (length,) = RECORD_LENGTH.unpack(head) if len(head) == RECORD_LENGTH.size else (0,)
        record = file.read(length) if 0 < length <= MAX_RECORD else b""
        if not record or len(record) != length:
            raise BackupCorrupt(f"backup {where} is truncated (chunk {index})", op="restore")
        try:
            plain = box.decrypt(record)
        except nacl.exceptions.CryptoError:
            raise BackupCorrupt(
                f"cannot decrypt backup {where} (chunk {index}): made with another key, or damaged",
                op="restore",
                hint="check that state.backup.encryption_key is the key the backup was made with",
            ) from None
        if len(plain) < CHUNK_PREFIX.size:
            raise BackupCorrupt(f"backup {where}: chunk {index} is too short", op="restore")
        chunk_file, chunk_index, final = CHUNK_PREFIX.unpack_from(plain)
        if chunk_file != file_id or chunk_index != index:
            raise BackupCorrupt(f"backup {where}: chunk {index} is out of place", op="restore")
        yield plain[CHUNK_PREFIX.size :]
        if final:
            break
    if file.read(1):
        raise BackupCorrupt(f"backup {where}: data after the final chunk", op="restore")


def decompress(blocks: Iterable[bytes], where: str) -> Iterator[bytes]:
    decompressor = lz4.frame.LZ4FrameDecompressor()
    done = False
    try:
        for block in blocks:
            if done and block:
                raise BackupCorrupt(f"backup {where}: data after the end", op="restore")
            data = block
            while not done:
                # Bounded output: a highly compressible chunk must not expand all at once.
                out = decompressor.decompress(data, max_length=CHUNK)
                data = b""
                if out:
                    yield out
                done = bool(decompressor.eof)
                if decompressor.needs_input:
                    break
            if done and decompressor.unused_data:
                raise BackupCorrupt(f"backup {where}: data after the end", op="restore")
    except RuntimeError as error:  # lz4 reports bad frames and checksums this way
        raise BackupCorrupt(f"backup {where} does not decompress: {error}", op="restore") from None
    if not done:
        raise BackupCorrupt(f"backup {where} is truncated", op="restore")
