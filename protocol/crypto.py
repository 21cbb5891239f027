"""Keys, the handshake and the per-direction stream ciphers, all from PyNaCl primitives.

The handshake has the shape of Noise ``NNpsk2`` (ephemeral X25519 both ways, the pre-shared key
mixed in after the ephemeral-ephemeral DH) followed by one confirmation message::

    -> version, key_id, e                      (41 bytes, clear)
    <- e, ee, psk, AEAD(header responder->initiator)   (72 bytes)
    -> AEAD(header initiator->responder)               (40 bytes)

The prologue binds the protocol version and the cluster id, so nodes of another cluster or
version fail the first AEAD exactly as a wrong key does. The third message proves to the
responder that the initiator holds the key before the responder accepts any data. Each side
ends up with one secretstream (XChaCha20-Poly1305) per direction; its headers travel inside the
AEAD payloads. Secretstream numbers its messages internally, so a reordered, replayed or dropped
frame fails to open, and the final tag makes truncation detectable.

Key derivation is HKDF in shape with keyed BLAKE2b as the PRF. Every BLAKE2b call goes through
`_blake2b`, which asks PyNaCl for raw bytes: its default encoder is hex, which would silently
halve a key's entropy per byte.
"""

from __future__ import annotations

import struct
import unicodedata
from dataclasses import dataclass

import nacl.bindings as sodium
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.pwhash
import nacl.utils

from protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "HANDSHAKE_MESSAGE_SIZES",
    "KEY_ID_SIZE",
    "MIN_PASSPHRASE_LENGTH",
    "PROTOCOL_VERSION",
    "STREAM_OVERHEAD",
    "InitiatorHandshake",
    "Keyring",
    "ResponderHandshake",
    "StreamReceiver",
    "StreamSender",
    "derive_salt",
    "key_id",
    "stretch_passphrase",
]

PROTOCOL_VERSION = 2  # 2: SnapshotBegin declares each table's bytes
KEY_SIZE = 32
KEY_ID_SIZE = 8
DH_SIZE = 32
HASH_SIZE = 64
AEAD_TAG_SIZE = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
STREAM_HEADER_SIZE = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
STREAM_OVERHEAD = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_PUSH = sodium.crypto_secretstream_xchacha20poly1305_TAG_PUSH
TAG_REKEY = sodium.crypto_secretstream_xchacha20poly1305_TAG_REKEY
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
MIN_PASSPHRASE_LENGTH = 16

_PROTOCOL_NAME = b"Noise_NNpsk2+confirm_25519_XChaChaPoly_BLAKE2b/replicator"
_MESSAGE1 = struct.Struct(f">B{KEY_ID_SIZE}s{DH_SIZE}s")
HANDSHAKE_MESSAGE_SIZES = (
    _MESSAGE1.size,
    DH_SIZE + STREAM_HEADER_SIZE + AEAD_TAG_SIZE,
    STREAM_HEADER_SIZE + AEAD_TAG_SIZE,
)
_AUTH_FAILED = "handshake authentication failed (wrong key, wrong cluster id, or tampered data)"


def _blake2b(data: bytes, *, size: int = HASH_SIZE, key: bytes = b"", person: bytes = b"") -> bytes:
    return nacl.hash.blake2b(
        data, digest_size=size, key=key, person=person, encoder=nacl.encoding.RawEncoder
    )


# ---------------------------------------------------------------------------------------------
# Pre-shared keys


def derive_salt(cluster_id: str) -> bytes:
    """The Argon2id salt: fixed per cluster so every node derives the same key."""
    return _blake2b(
        cluster_id.encode(),
        size=nacl.pwhash.argon2id.SALTBYTES,
        person=b"repl-psk-salt",
    )


def stretch_passphrase(
    passphrase: str,
    cluster_id: str,
    *,
    opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
    memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
) -> bytes:
    """Turn the configured passphrase into a 32-byte PSK (slow on purpose: call once at start).

    The passphrase is NFC-normalised so the same words typed on two systems give one key.
    """
    normalised = unicodedata.normalize("NFC", passphrase)
    if len(normalised) < MIN_PASSPHRASE_LENGTH:
        raise ValueError(
            f"secret key must be at least {MIN_PASSPHRASE_LENGTH} characters "
            f"(got {len(normalised)}); 'replicator keygen' writes a strong one"
        )
    return nacl.pwhash.argon2id.kdf(
        KEY_SIZE,
        normalised.encode(),
        derive_salt(cluster_id),
        opslimit=opslimit,
        memlimit=memlimit,
    )


def key_id(psk: bytes) -> bytes:
    """A short public fingerprint of a PSK, so a responder can pick the key an initiator used."""
    return _blake2b(b"key id", size=KEY_ID_SIZE, key=psk, person=b"repl-key-id")


@dataclass(frozen=True, slots=True)
class Keyring:
    """The current PSK and, during a rotation, the previous one (both 32 bytes)."""

    current: bytes
    previous: bytes | None = None

    def __post_init__(self) -> None:
        for psk in (self.current, self.previous):
            if psk is not None and len(psk) != KEY_SIZE:
                raise ValueError(f"a pre-shared key must be {KEY_SIZE} bytes, got {len(psk)}")

    def __repr__(self) -> str:  # never print key material
        return f"Keyring(current={key_id(self.current).hex()}, previous={self._previous_id()})"

    def _previous_id(self) -> str | None:
        return None if self.previous is None else key_id(self.previous).hex()

    def lookup(self, wanted: bytes) -> bytes | None:
        for psk in (self.current, self.previous):
            if psk is not None and key_id(psk) == wanted:
                return psk
        return None


# ---------------------------------------------------------------------------------------------
# Noise symmetric state


def _hkdf(chaining_key: bytes, material: bytes, outputs: int) -> list[bytes]:
    temp_key = _blake2b(material, key=chaining_key)
    result: list[bytes] = []
    previous = b""
    for index in range(1, outputs + 1):
        previous = _blake2b(previous + bytes([index]), key=temp_key)
        result.append(previous)
    return result


class _SymmetricState:
    __slots__ = ("_ck", "_h", "_k", "_n")

    def __init__(self, prologue: bytes) -> None:
        self._h = _blake2b(_PROTOCOL_NAME)
        self._ck = self._h
        self._k: bytes | None = None
        self._n = 0
        self.mix_hash(prologue)

    def mix_hash(self, data: bytes) -> None:
        self._h = _blake2b(self._h + data)

    def mix_key(self, material: bytes) -> None:
        self._ck, temp_k = _hkdf(self._ck, material, 2)
        self._k, self._n = temp_k[:KEY_SIZE], 0

    def mix_key_and_hash(self, material: bytes) -> None:
        self._ck, temp_h, temp_k = _hkdf(self._ck, material, 3)
        self.mix_hash(temp_h)
        self._k, self._n = temp_k[:KEY_SIZE], 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self._k is not None
        ciphertext: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, self._h, self._nonce(), self._k
        )
        self._n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self._k is not None
        try:
            plaintext: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                ciphertext, self._h, self._nonce(), self._k
            )
        except nacl.exceptions.CryptoError:
            raise RemoteProtocolError(_AUTH_FAILED) from None
        self._n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        first, second = _hkdf(self._ck, b"", 2)
        return first[:KEY_SIZE], second[:KEY_SIZE]

    def _nonce(self) -> bytes:
        return bytes(16) + self._n.to_bytes(8, "little")


def _prologue(cluster_id: str) -> bytes:
    encoded = cluster_id.encode()
    return b"replicator" + bytes([PROTOCOL_VERSION]) + len(encoded).to_bytes(2, "big") + encoded


def _dh(secret: bytes, public: bytes) -> bytes:
    """X25519, refusing the low-order points that would make the shared secret predictable."""
    if public == bytes(DH_SIZE):
        raise RemoteProtocolError("peer sent an all-zero ephemeral key")
    try:
        shared: bytes = sodium.crypto_scalarmult(secret, public)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.CryptoError):
        # libsodium refuses small-order points itself (result would be all zeros).
        raise RemoteProtocolError("peer sent a low-order ephemeral key") from None
    if shared == bytes(DH_SIZE):
        raise RemoteProtocolError("peer sent a low-order ephemeral key")
    return shared


def _ephemeral() -> tuple[bytes, bytes]:
    secret = nacl.utils.random(DH_SIZE)
    return secret, sodium.crypto_scalarmult_base(secret)


# ---------------------------------------------------------------------------------------------
# Stream ciphers


class StreamSender:
    """Seals one direction's messages in order; the peer's `StreamReceiver` must open each."""

    __slots__ = ("_state", "header")

    def __init__(self, key: bytes) -> None:
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self.header: bytes = sodium.crypto_secretstream_xchacha20poly1305_init_push(
            self._state, key
        )

    def seal(self, plaintext: bytes, associated_data: bytes, tag: int = TAG_MESSAGE) -> bytes:
        sealed: bytes = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, plaintext, associated_data, tag
        )
        return sealed


class StreamReceiver:
    __slots__ = ("_state",)

    def __init__(self, key: bytes, header: bytes) -> None:
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)

    def open(self, ciphertext: bytes, associated_data: bytes) -> tuple[bytes, int]:
        """Plaintext and tag; a forged, reordered or replayed frame raises."""
        try:
            plaintext, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                self._state, ciphertext, associated_data
            )
        except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError):
            raise RemoteProtocolError(
                "frame failed authentication (tampered, replayed, reordered or dropped data)"
            ) from None
        return plaintext, tag


# ---------------------------------------------------------------------------------------------
# Handshake roles


class InitiatorHandshake:
    """The dialling side: `message1()`, then `read_message2()` which returns message 3."""

    __slots__ = ("_ephemeral_secret", "_psk", "_state", "key_id", "receiver", "sender")

    def __init__(self, keyring: Keyring, cluster_id: str, *, use_previous: bool = False) -> None:
        psk = keyring.previous if use_previous else keyring.current
        if psk is None:
            raise LocalProtocolError("no previous key to use")
        self._psk = psk
        self.key_id = key_id(psk)
        self._state = _SymmetricState(_prologue(cluster_id))
        self._ephemeral_secret = b""
        self.sender: StreamSender | None = None
        self.receiver: StreamReceiver | None = None

    def message1(self) -> bytes:
        secret, public = _ephemeral()
        self._ephemeral_secret = secret
        message = _MESSAGE1.pack(PROTOCOL_VERSION, self.key_id, public)
        self._state.mix_hash(message[: 1 + KEY_ID_SIZE])
        self._state.mix_hash(public)
        self._state.mix_key(public)
        return message

    def read_message2(self, message: bytes) -> bytes:
        """Authenticate the responder; returns message 3 and sets `sender` / `receiver`."""
        if len(message) != HANDSHAKE_MESSAGE_SIZES[1]:
            raise RemoteProtocolError(f"handshake message 2 has {len(message)} bytes")
        state = self._state
        remote_public, payload = message[:DH_SIZE], message[DH_SIZE:]
        state.mix_hash(remote_public)
        state.mix_key(remote_public)
        state.mix_key(_dh(self._ephemeral_secret, remote_public))
        state.mix_key_and_hash(self._psk)
        receive_header = state.decrypt_and_hash(payload)
        to_responder, to_initiator = state.split()
        self.receiver = StreamReceiver(to_initiator, receive_header)
        self.sender = StreamSender(to_responder)
        return state.encrypt_and_hash(self.sender.header)


class ResponderHandshake:
    """The accepting side: `read_message1()` returns message 2, then `read_message3()`."""

    __slots__ = ("_keyring", "_state", "_to_responder", "key_id", "receiver", "sender")

    def __init__(self, keyring: Keyring, cluster_id: str) -> None:
        self._keyring = keyring
        self._state = _SymmetricState(_prologue(cluster_id))
        self._to_responder = b""
        self.key_id = b""
        self.sender: StreamSender | None = None
        self.receiver: StreamReceiver | None = None

    def read_message1(self, message: bytes) -> bytes:
        if len(message) != HANDSHAKE_MESSAGE_SIZES[0]:
            raise RemoteProtocolError(f"handshake message 1 has {len(message)} bytes")
        version, wanted_key_id, remote_public = _MESSAGE1.unpack(message)
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"peer speaks protocol version {version}, this node speaks {PROTOCOL_VERSION}"
            )
        psk = self._keyring.lookup(wanted_key_id)
        if psk is None:
            raise RemoteProtocolError(
                f"peer used key id {wanted_key_id.hex()}, which is not in this node's keyring"
            )
        self.key_id = wanted_key_id
        state = self._state
        state.mix_hash(message[: 1 + KEY_ID_SIZE])
        state.mix_hash(remote_public)
        state.mix_key(remote_public)
        secret, public = _ephemeral()
        state.mix_hash(public)
        state.mix_key(public)
        state.mix_key(_dh(secret, remote_public))
        state.mix_key_and_hash(psk)
        self._to_responder, to_initiator = state.split()
        self.sender = StreamSender(to_initiator)
        return public + state.encrypt_and_hash(self.sender.header)

    def read_message3(self, message: bytes) -> None:
        if len(message) != HANDSHAKE_MESSAGE_SIZES[2]:
            raise RemoteProtocolError(f"handshake message 3 has {len(message)} bytes")
        receive_header = self._state.decrypt_and_hash(message)
        self.receiver = StreamReceiver(self._to_responder, receive_header)
