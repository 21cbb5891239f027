"""Peer connections over real sockets on 127.0.0.1.

Rules for this module: port 0 everywhere; every test runs under an absolute `fail_after`; the
listener side accepts one stream at a time so the order of events is deterministic.
"""

from __future__ import annotations

import os

import pytest
import trio

from protocol import Goodbye, Heartbeat, Keyring, SessionSettings
from protocol.framing import frame_header
from replicator.sync.peer import PeerConnection, PeerDisconnected, PeerSettings

CLUSTER = "peer-tests"


def settings(keyring: Keyring, handshake_timeout: float = 2.0) -> PeerSettings:
    return PeerSettings(
        CLUSTER, keyring, SessionSettings(max_frame_size=1 << 16), handshake_timeout
    )


async def listen() -> tuple[trio.SocketListener, int]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener, listener.socket.getsockname()[1]


async def accept_one(listener: trio.SocketListener, peer: PeerSettings) -> PeerConnection:
    stream = await listener.accept()
    return await PeerConnection.accept(stream, peer, "test-client")


async def test_dial_and_accept_exchange_messages_both_ways() -> None:
    keyring = Keyring(os.urandom(32))
    listener, port = await listen()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            accepted: list[PeerConnection] = []

            async def server() -> None:
                accepted.append(await accept_one(listener, settings(keyring)))

            nursery.start_soon(server)
            client = await PeerConnection.dial("127.0.0.1", port, settings(keyring))
        server_side = accepted[0]
        assert client.key_id == server_side.key_id
        await client.send(Heartbeat(1, {}, {}))
        assert await server_side.receive() == Heartbeat(1, {}, {})
        await server_side.send(Heartbeat(2, {}, {"t": b"x"}))
        assert await client.receive() == Heartbeat(2, {}, {"t": b"x"})
        await client.close("done")
        assert await server_side.receive() == Goodbye("done")
        with pytest.raises(PeerDisconnected, match="closed"):
            await server_side.receive()
        await server_side.close()
        await listener.aclose()


async def test_wrong_key_is_refused_and_the_listener_serves_the_next_peer() -> None:
    keyring = Keyring(os.urandom(32))
    listener, port = await listen()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            outcome: list[str] = []

            async def server() -> None:
                for _ in range(2):
                    try:
                        connection = await accept_one(listener, settings(keyring))
                    except PeerDisconnected as error:
                        outcome.append(f"refused: {error}")
                    else:
                        outcome.append("accepted")
                        await connection.abort()

            nursery.start_soon(server)
            with pytest.raises(PeerDisconnected):
                await PeerConnection.dial("127.0.0.1", port, settings(Keyring(os.urandom(32))))
            good = await PeerConnection.dial("127.0.0.1", port, settings(keyring))
            await good.abort()
        assert outcome[0].startswith("refused")
        assert "keyring" in outcome[0]
        assert outcome[1] == "accepted"
        await listener.aclose()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "frame length"),
        (frame_header(0xFFFFFFFF), "exceeds the cap"),
        (b"", "end of stream"),
    ],
    ids=["garbage", "oversize length", "immediate close"],
)
async def test_hostile_client_is_dropped_during_the_handshake(payload: bytes, reason: str) -> None:
    keyring = Keyring(os.urandom(32))
    listener, port = await listen()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            errors: list[str] = []

            async def server() -> None:
                try:
                    await accept_one(listener, settings(keyring))
                except PeerDisconnected as error:
                    errors.append(str(error))

            nursery.start_soon(server)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            if payload:
                await stream.send_all(payload)
            await stream.aclose()
        assert len(errors) == 1
        assert reason in errors[0]
        await listener.aclose()


async def test_silent_client_is_dropped_at_the_handshake_deadline() -> None:
    keyring = Keyring(os.urandom(32))
    listener, port = await listen()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            errors: list[str] = []

            async def server() -> None:
                try:
                    await accept_one(listener, settings(keyring, handshake_timeout=0.3))
                except PeerDisconnected as error:
                    errors.append(str(error))

            nursery.start_soon(server)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            started = trio.current_time()
            await trio.sleep(0.6)  # says nothing at all
            assert await stream.receive_some(10) == b""  # the server hung up on us
            await stream.aclose()
        assert errors == ["handshake not completed within 0.3s (op=handshake, peer=test-client)"]
        assert trio.current_time() - started < 5
        await listener.aclose()


async def test_dialling_a_closed_port_is_a_clean_disconnect() -> None:
    listener, port = await listen()
    await listener.aclose()
    with trio.fail_after(10), pytest.raises(PeerDisconnected, match="cannot connect"):
        await PeerConnection.dial("127.0.0.1", port, settings(Keyring(os.urandom(32))))
