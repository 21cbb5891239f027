"""Backups of the state database: consistent copies, compressed, encrypted, kept by retention.

Why this shape:

- The copy is made with SQLite's online backup API in one step from a fresh connection, so it
  is one snapshot even while the node and the applications keep writing (WAL readers never
  block writers). Everything recorded about a backup (version vector, schema versions) is read
  from the copy itself, so it matches the data by construction.
- The copy is then streamed, in bounded chunks, through lz4 and SecretBox into the backup file:
  memory never grows with the database.
- A backup becomes visible only when both its data file and its metadata sidecar were written,
  fsynced and renamed into place; a kill at any point leaves temporary files that the next
  `BackupStore` removes, never a partial backup.
- Reading verifies the whole-file checksum first, then decodes to a temporary SQLite file and
  runs ``PRAGMA integrity_check``; a restore touches the live database only after all of that,
  and through the backup API (applications keep the live file open, so it is never replaced).

A directory shared by several nodes holds each node's backups side by side: a `BackupStore`
lists, prunes and cleans up only its own node's files.

The file format is in `backup_format`, the retention rule in `backup_retention`.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import nacl.exceptions
import nacl.secret

from replicator.capture.bookkeeping import vector_of_copy
from replicator.capture.migrations import recorded_version
from replicator.capture.sealing import seal_pending
from replicator.capture.transactions import write_transaction
from replicator.config import BackupConfig
from replicator.durability.backup_format import (
    FLAG_COMPRESSED,
    FLAG_ENCRYPTED,
    FORMAT,
    HEADER,
    MAGIC,
    BackupCorrupt,
    BackupError,
    BackupInfo,
    BackupKeyError,
    Compressor,
    Encryptor,
    HashingWriter,
    Sink,
    decompress,
    decrypt,
    load_key,
    read_blocks,
)
from replicator.durability.backup_retention import expired
from replicator.log import get_logger

__all__ = [
    "BackupCorrupt",
    "BackupError",
    "BackupInfo",
    "BackupKeyError",
    "BackupStore",
    "expired",
    "load_key",
]

_log = get_logger("backup")

DATA_SUFFIX = ".backup"
META_SUFFIX = ".json"
TEMP_PREFIX = ".tmp-"
FILE_MODE = 0o640
DIR_MODE = 0o750
BUSY_TIMEOUT_S = 30.0
_TEMP = re.compile(
    r"^\.tmp-(?P<stem>[A-Za-z0-9_~-]+)\.(?:lock|data|json|db(?:-journal|-wal|-shm)?)$"
)


class _Missing(BackupError):
    """No such backup (or it is being removed)."""


# ---------------------------------------------------------------------------------------------
# Files


def _create(path: Path) -> IO[bytes]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # whatever the umask
    return os.fdopen(fd, "wb")


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sqlite_files(path: Path) -> list[Path]:
    return [path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))]


def _file_checksum(path: Path) -> tuple[int, str]:
    digest = hashlib.blake2b(digest_size=32)
    size = 0
    with path.open("rb") as file:
        for block in read_blocks(file):
            digest.update(block)
            size += len(block)
    return size, f"blake2b:{digest.hexdigest()}"


def _uri(path: Path | str, mode: str) -> str:
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?mode={mode}"


def _facts(conn: sqlite3.Connection) -> tuple[int, int, dict[str, int]]:
    """user_version, `_repl_*` schema version and version vector of a copy (same rule as
    `Store.version_vector`: applied progress per origin, plus this node's own captures)."""
    user_version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    replicator_schema = recorded_version(conn) or 0
    vector = {str(origin): int(seq) for origin, seq in vector_of_copy(conn).items()}
    return user_version, replicator_schema, vector


def _acquire(lock: Path) -> int:
    """Create and hold an operation's lock file (FileExistsError: taken). While it is held,
    `BackupStore._clean` of any instance leaves the operation's files alone; the kernel drops
    the lock when the process dies, even by kill -9."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)  # a cleaner locked it first and removed it as a leftover: again


@contextlib.contextmanager
def _unless_running(lock: Path) -> Iterator[bool]:
    """True, holding the lock file if there is one, when no running operation holds it."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


class BackupStore:
    """The backups of one node in one directory. Synchronous: call it from a worker thread."""

    def __init__(self, config: BackupConfig, node_id: str) -> None:
        """Creates the directory if missing (mode 0750). Loads the key now when encryption is
        on (so a bad key file refuses the node at start). Removes leftovers of interrupted
        backups (temp files)."""
        if not config.directory:
            raise BackupError("state.backup.directory is not set", op="backup")
        self.config = config
        self.node_id = node_id
        self.directory = Path(config.directory)
        self._prefix = re.sub(r"[^A-Za-z0-9_-]", "_", node_id) or "_"
        self._own = re.compile(rf"^{re.escape(self._prefix)}-\d{{8}}T\d{{9}}Z(?:-[0-9a-f]{{4}})?$")
        try:
            if not self.directory.is_dir():
                self.directory.mkdir(parents=True, mode=DIR_MODE)
                self.directory.chmod(DIR_MODE)
        except OSError as error:
            raise BackupError(
                f"cannot create the backup directory {self.directory}: {error.strerror}",
                op="backup",
                hint="check state.backup.directory and its parent's permissions",
            ) from None
        self._box: nacl.secret.SecretBox | None = None
        if config.encryption:
            self._box = nacl.secret.SecretBox(self._key_path_key())
        self._clean()

    # -- reading ---------------------------------------------------------------------------

    def list(self) -> list[BackupInfo]:
        """This node's complete backups (metadata and data file present), newest first."""
        found = []
        try:
            entries = [entry.name for entry in os.scandir(self.directory)]
        except OSError as error:
            raise self._os_error("cannot list", self.directory, error) from None
        for entry in entries:
            name = entry.removesuffix(META_SUFFIX)
            if name == entry or not self._own.match(name):
                continue
            try:
                found.append(self._load(name))
            except BackupCorrupt as error:
                _log.warning("backup metadata unreadable, skipped", name=name, error=str(error))
            except _Missing:
                continue  # no data file: being removed, or an interrupted backup
        return sorted(found, key=lambda info: (info.created_at, info.name), reverse=True)

    def get(self, name: str) -> BackupInfo:
        if not self._own.match(name):
            raise _Missing(f"no backup {name!r}", op="backup")
        return self._load(name)

    def verify(self, name: str) -> BackupInfo:
        """Re-checksums the stored file; BackupCorrupt if it differs."""
        info = self.get(name)
        path = self._data_path(name)
        try:
            size, checksum = _file_checksum(path)
        except OSError as error:
            raise self._os_error("cannot read", path, error) from None
        if size != info.size:
            raise BackupCorrupt(
                f"backup {path} is {size} bytes, its metadata says {info.size}", op="verify"
            )
        if checksum != info.checksum:
            raise BackupCorrupt(
                f"backup {path} fails its checksum (the file or its metadata changed)",
                op="verify",
            )
        return info

    @contextlib.contextmanager
    def opened(self, name: str) -> Iterator[str]:
        """Verify the checksum FIRST, then decrypt/decompress to a temporary SQLite file next to
        the backups (streaming, bounded memory), run PRAGMA integrity_check on it (BackupCorrupt
        if not ok), yield its path, remove it afterwards."""
        info = self.verify(name)
        stem = f"{name}~{secrets.token_hex(4)}"
        target = self._temp(stem, "db")
        with self._held(stem, self._lock(stem)):
            try:
                self._decode(info, target)
                self._check_database(info, target)
                yield str(target)
            finally:
                _remove(*_sqlite_files(target))

    def restore_into(self, name: str, conn: sqlite3.Connection) -> BackupInfo:
        """Write the verified backup into the live database through `conn` (an open connection
        to the live file) using SQLite's online backup API, never by renaming files
        (applications keep the live file open). Nothing touches `conn` before verification
        succeeded."""
        started = time.monotonic()
        info = self.get(name)
        with self.opened(name) as path:
            source = sqlite3.connect(_uri(path, "ro"), uri=True)
            try:
                source.backup(conn)
            except sqlite3.Error as error:
                raise BackupError(
                    f"cannot restore backup {name} into the live database: {error}",
                    op="restore",
                    hint="no transaction may be open on the connection restored into",
                ) from None
            finally:
                source.close()
        _log.info("backup restored", name=name, seconds=round(time.monotonic() - started, 3))
        return info

    def newest_good(self) -> BackupInfo | None:
        """The newest backup that verifies (checksum): what auto-recovery restores."""
        for info in self.list():
            try:
                return self.verify(info.name)
            except BackupError as error:
                _log.warning("backup skipped: does not verify", name=info.name, error=str(error))
        return None

    # -- writing ---------------------------------------------------------------------------

    def create(
        self, db_path: str, *, description: str | None = None, now: float | None = None
    ) -> BackupInfo:
        """Back up the database at `db_path` while others keep writing to it."""
        started = time.monotonic()
        created_at = time.time() if now is None else now
        name, lock = self._claim(created_at)
        copy, data_temp, meta_temp = (self._temp(name, k) for k in ("db", "data", "json"))
        data, meta = self._data_path(name), self._meta_path(name)
        with self._held(name, lock):
            try:
                try:
                    database_bytes, facts = self._snapshot(db_path, copy)
                    size, checksum = self._encode(copy, data_temp)
                finally:
                    _remove(*_sqlite_files(copy))
                info = BackupInfo(
                    name=name,
                    node_id=self.node_id,
                    created_at=created_at,
                    size=size,
                    database_bytes=database_bytes,
                    checksum=checksum,
                    description=description,
                    schema_version=facts[0],
                    replicator_schema=facts[1],
                    vector=facts[2],
                    compressed=self.config.compression,
                    encrypted=self._box is not None,
                )
                self._write_metadata(info, meta_temp)
                # Data first: a data file without metadata is never listed, and is removed.
                data_temp.rename(data)
                meta_temp.rename(meta)
                _fsync_directory(self.directory)
            except OSError as error:
                _remove(data_temp, meta_temp, meta, data)
                raise self._os_error("cannot write backup", data, error) from None
            except BaseException:
                _remove(data_temp, meta_temp, meta, data)
                raise
        _log.info(
            "backup created",
            name=name,
            size=size,
            database_bytes=database_bytes,
            seconds=round(time.monotonic() - started, 3),
        )
        return info

    def prune(self, now: float | None = None) -> builtins.list[str]:
        """Apply retention to this node's backups; returns the names removed."""
        moment = time.time() if now is None else now
        names = expired(self.list(), self.config.retention, moment)
        for name in names:
            self._delete(name)
            _log.info("backup removed by retention", name=name)
        return names

    def remove(self, name: str) -> None:
        """Delete one backup (BackupError if unknown)."""
        self.get(name)
        self._delete(name)
        _log.info("backup removed", name=name)

    # -- internals -------------------------------------------------------------------------

    def _delete(self, name: str) -> None:
        # Metadata first: from then on the backup is not listed, whatever happens next.
        try:
            _remove(self._meta_path(name), self._data_path(name))
            _fsync_directory(self.directory)
        except OSError as error:
            raise self._os_error("cannot remove", self._data_path(name), error) from None

    def _key_path_key(self) -> bytes:
        if self.config.encryption_key is None:
            raise BackupKeyError(
                "encrypted backups need a key file (state.backup.encryption_key)",
                op="backup",
                hint="create one with `replicator keygen PATH`",
            )
        return load_key(self.config.encryption_key)

    def _data_path(self, name: str) -> Path:
        return self.directory / f"{name}{DATA_SUFFIX}"

    def _meta_path(self, name: str) -> Path:
        return self.directory / f"{name}{META_SUFFIX}"

    def _temp(self, stem: str, kind: str) -> Path:
        return self.directory / f"{TEMP_PREFIX}{stem}.{kind}"

    def _os_error(self, what: str, path: Path, error: OSError) -> BackupError:
        return BackupError(
            f"{what} {path}: {error.strerror or error}",
            op="backup",
            hint="check free space and permissions of state.backup.directory",
        )

    def _lock(self, stem: str) -> int:
        lock = self._temp(stem, "lock")
        try:
            return _acquire(lock)
        except FileExistsError:
            raise
        except OSError as error:
            raise self._os_error("cannot create", lock, error) from None

    @contextlib.contextmanager
    def _held(self, stem: str, fd: int) -> Iterator[None]:
        try:
            yield
        finally:
            _remove(self._temp(stem, "lock"))
            os.close(fd)

    def _claim(self, created_at: float) -> tuple[str, int]:
        """A fresh name, sortable by time, and its held lock: creating the lock file decides
        between creators racing for the same millisecond."""
        seconds, millis = divmod(int(created_at * 1000), 1000)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds))
        base = name = f"{self._prefix}-{stamp}{millis:03d}Z"
        while True:
            if not (self._data_path(name).exists() or self._meta_path(name).exists()):
                with contextlib.suppress(FileExistsError):
                    return name, self._lock(name)
            name = f"{base}-{secrets.token_hex(2)}"

    def _load(self, name: str) -> BackupInfo:
        meta = self._meta_path(name)
        try:
            text = meta.read_text()
        except FileNotFoundError:
            raise _Missing(f"no backup {name!r}", op="backup") from None
        except OSError as error:
            raise self._os_error("cannot read", meta, error) from None
        if not self._data_path(name).is_file():
            raise _Missing(f"no backup {name!r}", op="backup")
        try:
            info = BackupInfo.from_dict(json.loads(text))
        except (ValueError, TypeError, KeyError) as error:
            raise BackupCorrupt(
                f"backup metadata {meta} is invalid: {error}", op="backup"
            ) from None
        if info.name != name or info.node_id != self.node_id:
            raise BackupCorrupt(
                f"backup metadata {meta} names {info.name!r} of node {info.node_id!r}",
                op="backup",
            )
        return info

    def _snapshot(self, db_path: str, copy: Path) -> tuple[int, tuple[int, int, dict[str, int]]]:
        """One consistent copy of the live database, in one backup step."""
        if not os.path.isfile(db_path):
            raise BackupError(f"cannot back up {db_path}: no such database file", op="backup")
        try:
            source = sqlite3.connect(_uri(db_path, "rw"), uri=True, timeout=BUSY_TIMEOUT_S)
        except sqlite3.Error as error:
            raise BackupError(f"cannot open {db_path}: {error}", op="backup") from None
        try:
            target = sqlite3.connect(copy, isolation_level=None)
            try:
                # The copy is scratch: no journal, no syncs (the backup file itself is fsynced).
                target.execute("PRAGMA journal_mode = OFF")
                target.execute("PRAGMA synchronous = OFF")
                source.backup(target)  # pages=-1: one step under one read transaction
                # Changes the node had not stamped yet get the stamps it will give them.
                with write_transaction(target):
                    seal_pending(target)
                # The copy inherits WAL mode from the header; a backup is one plain file.
                target.execute("PRAGMA journal_mode = DELETE")
                facts = _facts(target)
            finally:
                target.close()
        except sqlite3.Error as error:
            raise BackupError(f"cannot copy {db_path} to {copy}: {error}", op="backup") from None
        finally:
            source.close()
        return copy.stat().st_size, facts

    def _encode(self, copy: Path, temp: Path) -> tuple[int, str]:
        flags = (FLAG_COMPRESSED if self.config.compression else 0) | (
            FLAG_ENCRYPTED if self._box is not None else 0
        )
        file_id = secrets.token_bytes(16)
        with _create(temp) as file, copy.open("rb") as source:
            writer = HashingWriter(file)
            writer.write(HEADER.pack(MAGIC, FORMAT, flags, file_id))
            sink: Sink = writer
            if self._box is not None:
                sink = Encryptor(self._box, file_id, sink)
            if self.config.compression:
                sink = Compressor(self.config.compression_level, sink)
            for block in read_blocks(source):
                sink.write(block)
            sink.close()
        return writer.size, f"blake2b:{writer.hash.hexdigest()}"

    def _write_metadata(self, info: BackupInfo, temp: Path) -> None:
        with _create(temp) as file:
            file.write(json.dumps({"format": FORMAT, **info.as_dict()}, indent=2).encode())
            file.flush()
            os.fsync(file.fileno())

    def _reading_box(self) -> nacl.secret.SecretBox:
        if self._box is None:  # encryption is off now; the key file may still be configured
            self._box = nacl.secret.SecretBox(self._key_path_key())
        return self._box

    def _decode(self, info: BackupInfo, target: Path) -> None:
        path = self._data_path(info.name)
        written = 0
        try:
            with path.open("rb") as file, _create(target) as out:
                head = file.read(HEADER.size)
                magic, version, flags, file_id = (
                    HEADER.unpack(head) if len(head) == HEADER.size else (b"", 0, 0, b"")
                )
                if magic != MAGIC or version != FORMAT:
                    raise BackupCorrupt(f"{path} is not a backup (format {FORMAT})", op="restore")
                if flags != (FLAG_COMPRESSED * info.compressed | FLAG_ENCRYPTED * info.encrypted):
                    raise BackupCorrupt(f"{path}: header and metadata disagree", op="restore")
                blocks: Iterable[bytes] = read_blocks(file)
                if flags & FLAG_ENCRYPTED:
                    blocks = decrypt(file, self._reading_box(), file_id, str(path))
                if flags & FLAG_COMPRESSED:
                    blocks = decompress(blocks, str(path))
                for block in blocks:
                    out.write(block)
                    written += len(block)
        except OSError as error:
            raise self._os_error("cannot restore", path, error) from None
        if written != info.database_bytes:
            raise BackupCorrupt(
                f"backup {path} holds {written} database bytes, its metadata says "
                f"{info.database_bytes}",
                op="restore",
            )

    def _check_database(self, info: BackupInfo, path: Path) -> None:
        where = self._data_path(info.name)
        try:
            conn = sqlite3.connect(_uri(path, "ro"), uri=True)
            try:
                result = [row[0] for row in conn.execute("PRAGMA integrity_check(5)")]
            finally:
                conn.close()
        except sqlite3.Error as error:
            raise BackupCorrupt(
                f"backup {where} is not a valid SQLite database: {error}", op="restore"
            ) from None
        if result != ["ok"]:
            raise BackupCorrupt(
                f"backup {where} fails the integrity check: {'; '.join(map(str, result))}",
                op="restore",
            )

    def _clean(self) -> None:
        """Remove what interrupted operations of this node left (unless one still runs)."""
        stems: dict[str, list[Path]] = {}
        orphans: list[str] = []
        try:
            entries = list(os.scandir(self.directory))
        except OSError as error:
            raise self._os_error("cannot list", self.directory, error) from None
        for entry in entries:
            temp = _TEMP.match(entry.name)
            if temp and self._own.match(temp["stem"].split("~")[0]):
                stems.setdefault(temp["stem"], []).append(Path(entry.path))
            name = entry.name.removesuffix(DATA_SUFFIX)
            if name != entry.name and self._own.match(name) and not self._meta_path(name).exists():
                orphans.append(name)
        try:
            for stem, paths in stems.items():
                lock = self._temp(stem, "lock")
                with _unless_running(lock) as free:
                    if free:  # the lock goes last, still held: see `_lock`
                        _remove(*(p for p in paths if p != lock), lock)
                        files = sorted(p.name for p in paths)
                        _log.info("removed leftovers of an interrupted backup", files=files)
            for name in orphans:
                with _unless_running(self._temp(name, "lock")) as free:
                    if free and not self._meta_path(name).exists():
                        _remove(self._data_path(name))
                        _log.info("removed a backup file without metadata", name=name)
        except OSError as error:
            raise self._os_error("cannot clean up", self.directory, error) from None
