"""The node's connections: accept and dial, the handshake budget, Hello both ways, one link per
peer (a simultaneous dial is kept once, a live link is never displaced), and each link run
until it ends, its failure logged with the peer id and turned into a disconnect, never the end
of the node."""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from protocol import Change, Goodbye, Hello, Origin
from replicator.capture import sqlite_errors
from replicator.capture.log_reader import LogReader
from replicator.capture.migrations import SCHEMA_VERSION
from replicator.capture.store import StoreSettings
from replicator.clock import Clock
from replicator.config import PeerConfig, ResyncConfig
from replicator.durability.persistence import Persistence
from replicator.errors import first_leaf
from replicator.log import KEY_PEER, Throttle, get_logger
from replicator.node.alarms import Alarms
from replicator.node.applying import ApplyHandle
from replicator.node.options import NodeOptions
from replicator.node.vectors import VectorCache
from replicator.sync.faults import Faults
from replicator.sync.link import REPAIR_BY_KEY, Link, PauseSwitch, PeerStatus
from replicator.sync.membership import ClusterView, HelloRefused, check_hello, fingerprint
from replicator.sync.network import Listener
from replicator.sync.peer import PeerClosed, PeerConnection, PeerDisconnected, PeerSettings
from replicator.sync.resync import Resync

__all__ = ["CAPABILITIES", "Connections"]

_log = get_logger("node")
CAPABILITIES = frozenset({"changes", "skips", "resend", REPAIR_BY_KEY})
"""What this node understands, sent in its Hello (peers use only what both offer)."""
# accept() errors that mean "out of descriptors or memory for now": wait, do not crash.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# A connection that has sent nothing for this long may lose its place to a newcomer when the
# handshake limits are reached (a real peer speaks first, within a round trip of connecting),
# or sooner when the node runs out of descriptors.
_IDLE_SECONDS = 0.5
_IDLE_UNDER_PRESSURE = 0.2


@dataclass(slots=True)
class _Handshake:
    """An incoming connection between accept and Hello."""

    source: str
    started: float
    cancel: trio.CancelScope
    connection: PeerConnection


class Connections:
    """Keeps ``links`` (peer id -> its one live link) and the handshakes in progress."""

    def __init__(
        self,
        *,
        node_id: str,
        peers: Mapping[str, PeerConfig],
        status: Mapping[str, PeerStatus],
        links: dict[str, Link],
        options: NodeOptions,
        recovery: ResyncConfig,
        store_settings: StoreSettings,
        cluster: ClusterView,
        resync: Resync,
        applying: ApplyHandle,
        vectors: VectorCache,
        persistence: Persistence,
        pause: PauseSwitch,
        alarms: Alarms,
        faults: Faults,
        throttle: Throttle,
        role: Callable[[], str],
        origin: Callable[[], Origin | None],
        log_end: Callable[[], int],
        outgoing_filter: Callable[[], Callable[[Change], Change | None] | None],
        wait_for_log: Callable[[int], Any],
    ) -> None:
        self.node_id = node_id
        self.peers = peers
        self.status = status
        self.links = links
        self.peer_settings: PeerSettings | None = None  # set once the passphrases are stretched
        self.offered: dict[str, str] = {}  # the settings offered at Hello
        self.peer_roles: dict[str, str] = {}
        self.stopping = False
        self._options = options
        self._recovery = recovery
        self._store_settings = store_settings
        self._cluster = cluster
        self._resync = resync
        self._applying = applying
        self._vectors = vectors
        self._persistence = persistence
        self._pause = pause
        self._alarms = alarms
        self._faults = faults
        self._throttle = throttle
        self._role = role
        self._origin = origin
        self._log_end = log_end
        self._outgoing_filter = outgoing_filter
        self._wait_for_log = wait_for_log
        self._clock: Clock = options.clock
        self._handshakes: dict[int, _Handshake] = {}  # between accept and Hello, oldest first
        self._link_ended = trio.Event()

    # -- what the node asks --------------------------------------------------------------------

    def check_split_brain(self) -> None:
        """Alarm while this node and a peer both run as primary."""
        primaries = sorted(peer for peer, role in self.peer_roles.items() if role == "primary")
        if self._role() == "primary" and primaries:
            message = f"split brain: {self.node_id} and {', '.join(primaries)} are all primary"
            if self._alarms.get("split_brain") != message:
                _log.error("split-brain alarm", primaries=[self.node_id, *primaries])
            self._alarms.sound("split_brain", message)
        else:
            self._alarms.silence("split_brain")

    async def close_links(self, reason: str) -> None:
        """Close every link and wait until each has stopped applying (a few seconds at most)."""
        for link in list(self.links.values()):
            with contextlib.suppress(PeerDisconnected, trio.BrokenResourceError,
                                     trio.ClosedResourceError):  # fmt: skip
                await link.close(reason)
        with trio.move_on_after(5.0):
            while self.links:
                await self._link_ended.wait()
        for link in list(self.links.values()):
            await link.connection.abort()

    async def shutdown(self) -> None:
        """Say goodbye to every peer (briefly: a dead peer must not hold up the stop)."""
        self.stopping = True
        with trio.move_on_after(2):
            async with trio.open_nursery() as nursery:
                for link in list(self.links.values()):
                    nursery.start_soon(link.close, "node shutting down")

    # -- accepting -------------------------------------------------------------------------

    async def accept_loop(self, listener: Listener, nursery: trio.Nursery) -> None:
        """Accept peers until cancelled. Running out of descriptors never crashes: a
        connection that has said nothing for a while gives its descriptor up, or the loop
        waits (and says so, at a throttled rate)."""
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                self._faults.count("accept_errors")
                suppressed = self._throttle.allow("accept")
                if suppressed is not None:
                    _log.warning("cannot accept connections for now", reason=error.strerror,
                                 suppressed=suppressed)  # fmt: skip
                await trio.sleep(0.01 if self._evict_idle(None, _IDLE_UNDER_PRESSURE) else 0.1)
                continue
            nursery.start_soon(self._accept, stream)

    async def _accept(self, stream: trio.abc.Stream) -> None:
        label, source = self._options.network.remote(stream)
        if not self._room_for(source):
            self._faults.count("handshake_limit")
            await trio.aclose_forcefully(stream)
            suppressed = self._throttle.allow("handshake_limit")
            if suppressed is not None:
                _log.warning("incoming connection refused: too many handshakes in progress",
                             remote=label, suppressed=suppressed)  # fmt: skip
            return
        assert self.peer_settings is not None
        connection = PeerConnection.responder(stream, self.peer_settings, label)
        pending = _Handshake(source, self._clock.monotonic(), trio.CancelScope(), connection)
        self._handshakes[id(pending)] = pending
        hello = None
        try:
            with pending.cancel:
                try:
                    await connection.handshake(self.peer_settings.handshake_timeout)
                except PeerDisconnected as error:
                    self._faults.count("handshake")
                    suppressed = self._throttle.allow("handshake_failed")
                    if suppressed is not None:
                        _log.warning("incoming connection refused", remote=label,
                                     reason=error.message, suppressed=suppressed)  # fmt: skip
                    return
                hello = await self._greet(connection, dialled=None)
            if pending.cancel.cancelled_caught:  # evicted: it had said nothing for too long
                self._faults.count("handshake_evicted")
                await connection.abort()
                return
        finally:
            self._handshakes.pop(id(pending), None)
        if hello is not None:
            await self._serve(connection, hello, initiator=None)

    def _room_for(self, source: str) -> bool:
        """Whether a connection from ``source`` may start a handshake now: within the limits,
        or once an idle one (silent since it connected) has been evicted to make room."""
        limits = self._options
        here = sum(1 for pending in self._handshakes.values() if pending.source == source)
        if here >= limits.max_handshakes_per_source:
            return self._evict_idle(source, _IDLE_SECONDS)
        if len(self._handshakes) >= limits.max_handshakes:
            return self._evict_idle(None, _IDLE_SECONDS)
        return True

    def _evict_idle(self, source: str | None, idle: float) -> bool:
        """Cancel the oldest handshake (of ``source``, if given) that has received nothing
        in ``idle`` seconds since it connected; True if there was one."""
        now = self._clock.monotonic()
        for key, pending in self._handshakes.items():
            if (
                (source is None or pending.source == source)
                and pending.connection.bytes_received == 0
                and now - pending.started >= idle
            ):
                pending.cancel.cancel()
                del self._handshakes[key]
                return True
        return False

    # -- dialling --------------------------------------------------------------------------

    async def dial_loop(self, peer_id: str) -> None:
        """Keep a link to ``peer_id``: dial, Hello, run the link; redial with backoff."""
        options = self._options
        peer = self.peers[peer_id]
        log = _log.bind(**{KEY_PEER: peer_id})
        delay = options.backoff_initial
        use_previous = False
        failures = 0
        assert self.peer_settings is not None
        while True:
            if peer_id in self.links:
                await trio.sleep(options.backoff_max * options.rng.uniform(0.5, 1))
                continue
            if self._persistence.degraded is not None:  # it would be refused: wait for room
                await self._persistence.writable.wait()
            self.status[peer_id].state = "connecting"
            try:
                connection = await PeerConnection.dial(
                    peer.host,
                    peer.port,
                    self.peer_settings,
                    use_previous_key=use_previous,
                    connect=options.network.connect,
                )
            except PeerDisconnected as error:
                self.status[peer_id].failed(error.message, self._clock.time())
                if self.status[peer_id].state == "connecting":
                    self.status[peer_id].state = "disconnected"
                # During a key rotation the peer may hold only the previous key.
                if self.peer_settings.keyring.previous is not None:
                    use_previous = not use_previous
                failures += 1
                if self._throttle.allow(("dial", peer_id)) is not None:
                    log.warning("cannot reach peer", address=peer.address, reason=error.message,
                                attempts=failures, retry_in=round(delay, 2))  # fmt: skip
                await trio.sleep(delay * options.rng.uniform(0.5, 1.5))
                delay = min(delay * 2, options.backoff_max)
                continue
            if failures:
                log.info("peer reachable again", address=peer.address, attempts=failures)
            delay, failures = options.backoff_initial, 0
            hello = await self._greet(connection, dialled=peer_id)
            if hello is None:  # refused: wait as after a failed dial
                await trio.sleep(options.backoff_max * options.rng.uniform(0.5, 1))
                continue
            await self._serve(connection, hello, initiator=self.node_id)

    # -- Hello -----------------------------------------------------------------------------

    async def _greet(self, connection: PeerConnection, dialled: str | None) -> Hello | None:
        """Hello both ways; None (the connection closed, the reason logged) if the peer may
        not have a link now. ``dialled``: the peer id this node dialled."""
        unavailable = self._state_unavailable()
        if unavailable is not None:
            _log.info("connection closed", remote=connection.label, reason=unavailable)
            await connection.close(unavailable)
            return None
        try:
            hello = await self._exchange_hello(connection)
            if dialled is not None and hello.node_id != dialled:
                raise HelloRefused(
                    f"dialled {dialled} at {connection.label}, but the peer says it is "
                    f"{hello.node_id!r}",
                    op="hello",
                    peer=dialled,
                    hint="check the peer's address in replication.peers",
                )
        except PeerClosed as error:  # it closed first (a duplicate of a simultaneous dial)
            _log.info("connection closed by the peer during Hello", remote=connection.label,
                      reason=error.message)  # fmt: skip
            await connection.abort()
            return None
        except (PeerDisconnected, HelloRefused) as error:
            self._faults.count("hello")
            source = dialled or connection.label.rpartition(":")[0]
            if self._throttle.allow(("hello", source)) is not None:
                _log.warning("peer refused", remote=connection.label, reason=str(error),
                             **({KEY_PEER: dialled} if dialled else {}))  # fmt: skip
            await connection.abort()
            return None
        return hello

    def _state_unavailable(self) -> str | None:
        """Why links are refused just now (None: they are not)."""
        persistence = self._persistence
        if persistence.restoring is not None:
            return f"restoring backup {persistence.restoring}"
        if persistence.degraded is not None:
            return "this node's state database refuses writes"
        return None

    async def _exchange_hello(self, connection: PeerConnection) -> Hello:
        vector = await self._applying.read_vector()
        origin = self._origin()
        assert origin is not None
        offered = self.offered
        hello = Hello(
            node_id=self.node_id,
            incarnation=origin.incarnation,
            capabilities=CAPABILITIES | {f"role:{self._role()}"},
            schema_version=SCHEMA_VERSION,
            settings_fingerprint=fingerprint(offered),
            version_vector=vector,
            settings=offered,
        )
        timeout = self._options.hello_timeout
        try:
            with trio.fail_after(timeout):
                await connection.send(hello)
                reply = await connection.receive()
        except trio.TooSlowError:
            raise PeerDisconnected(
                f"no Hello within {timeout:g}s", op="hello", peer=connection.label
            ) from None
        if isinstance(reply, Goodbye):
            raise PeerClosed(f"peer said goodbye: {reply.reason}", op="hello")
        if not isinstance(reply, Hello):
            raise HelloRefused(f"expected Hello, got {type(reply).__name__}", op="hello")
        check_hello(reply, local_id=self.node_id, expected=self.peers, settings=offered)
        role = _role_of(reply)
        configured = self.peers[reply.node_id].role
        if configured in ("primary", "replica") and configured != role:
            _log.warning("peer runs in another role than configured", configured=configured,
                         announced=role, **{KEY_PEER: reply.node_id})  # fmt: skip
        return reply

    # -- one link per peer -----------------------------------------------------------------

    async def _serve(self, connection: PeerConnection, hello: Hello, initiator: str | None) -> None:
        """Run the link until it ends. Whatever goes wrong with one peer ends that link (logged
        with the peer id and the reason), never the node; only a broken local database
        stops it."""
        peer_id = hello.node_id
        log = _log.bind(**{KEY_PEER: peer_id})
        link: Link | None = None
        try:
            link = await self._admit(connection, hello, initiator, log)
            if link is None:
                return
            try:
                await self._run_link(link)
                log.info("peer link closed")
            finally:
                await self._link_done(peer_id, link)
        except PeerDisconnected as error:
            if self.stopping:
                log.info("peer link closed", reason="node shutting down")
            elif link is not None and (
                link.replaced or self.links.get(peer_id) not in (None, link)
            ):
                log.info("peer link closed", reason="replaced by a newer connection")
            else:
                self.status[peer_id].failed(error.message, self._clock.time())
                log.warning("peer disconnected", reason=error.message)
        except Exception as error:
            fault = sqlite_errors.unusable(error)
            if fault is not None:
                raise fault from error
            leaf = first_leaf(error)
            reason = f"{type(leaf).__name__}: {leaf}"
            self._faults.count("link_error")
            self.status[peer_id].failed(reason, self._clock.time())
            if self._throttle.allow(("link_error", peer_id)) is not None:
                # A database condition (out of descriptors, say) is no bug: no traceback.
                log.error("peer link failed: disconnected", reason=reason,
                          exc_info=None if isinstance(leaf, sqlite3.Error) else leaf)  # fmt: skip
        finally:
            await connection.abort()

    async def _admit(
        self, connection: PeerConnection, hello: Hello, initiator: str | None, log: Any
    ) -> Link | None:
        """The link for this connection, or None when it must not replace the peer's link."""
        peer_id = hello.node_id
        self._alarms.silence(f"needs_snapshot:{peer_id}")  # the link raises it again if so
        preferred = min(self.node_id, peer_id)
        dialled_by = initiator if initiator is not None else peer_id
        existing = self.links.get(peer_id)
        if existing is not None:
            settled = self._clock.monotonic() - existing.started_at >= self._settle_seconds
            if settled and existing.heard_within(self._fresh_seconds):
                # A live link stays: a newcomer with the same id is a duplicate at best, an
                # impostor at worst.
                self._faults.count("identity")
                if self._throttle.allow(("duplicate", peer_id)) is not None:
                    log.warning("connection refused: this peer's link is alive",
                                remote=connection.label, dialled_by=dialled_by)  # fmt: skip
                await connection.close("duplicate connection")
                return None
            if not settled and dialled_by != preferred:
                # Both dialled at once: both sides keep the connection the smaller id dialled.
                log.debug("duplicate connection closed", dialled_by=dialled_by)
                await connection.close("duplicate connection")
                return None
            # The preferred connection of a simultaneous dial, or one replacing a dead link.
            # (Marked first: its tasks may see their socket closed before this link is in.)
            existing.replaced = True
            await existing.close(
                "replaced by the preferred connection" if not settled else "replaced: link silent"
            )
        link = Link(
            connection,
            hello,
            self.status[peer_id],
            node_id=self.node_id,
            settings=self._options.link,
            outgoing=self._outgoing_filter(),
            read_log=LogReader(
                self._store_settings, Origin(hello.node_id, hello.incarnation), self._log_end
            ),
            apply=self._applying.apply,
            wait_for_log=self._wait_for_log,
            vector=self._vectors.copy,
            cluster=self._cluster,
            snapshots=self._resync,
            pause=self._pause,
            alarms=self._alarms,
            faults=self._faults,
            clock=self._clock,
        )
        behind = self._vectors.behind(hello.version_vector)
        recovery = self._recovery
        last = self._resync.last_sent(peer_id)
        rested = last is None or self._clock.time() - last >= recovery.resync_interval
        if recovery.auto_resync and behind > recovery.resync_threshold and rested:
            # At most one finished snapshot per resync_interval: a peer that keeps falling
            # behind is streamed the log instead.
            link.request_snapshot(
                f"{behind} changes behind (resync_threshold {recovery.resync_threshold})"
            )
        self.links[peer_id] = link
        # Recorded with the link it came with: a link being replaced forgets its peer's role
        # when it ends (`_link_done`), which may be after this Hello was received.
        self.peer_roles[peer_id] = _role_of(hello)
        self.check_split_brain()
        log.info("peer connected", remote=connection.label, dialled_by=dialled_by)
        return link

    async def _run_link(self, link: Link) -> None:
        """The link, with a write the disk refused (in a snapshot merge, say) turned into the
        end of this link and a pause of replication, instead of the end of the node."""
        try:
            await link.run()
        except BaseExceptionGroup as group:
            refused, rest = group.split(sqlite3.DatabaseError)
            if refused is None or rest is not None:
                raise
            error = first_leaf(refused)
            if not self._persistence.write_failed(error, "a peer link"):
                raise
            raise PeerDisconnected(f"state database refuses writes: {error}") from None
        except sqlite3.DatabaseError as error:
            if not self._persistence.write_failed(error, "a peer link"):
                raise
            raise PeerDisconnected(f"state database refuses writes: {error}") from None

    async def _link_done(self, peer_id: str, link: Link) -> None:
        if self.links.get(peer_id) is not link:  # replaced by a newer connection
            return
        del self.links[peer_id]
        ended, self._link_ended = self._link_ended, trio.Event()
        ended.set()
        self.status[peer_id].state = "disconnected"
        self.peer_roles.pop(peer_id, None)
        self.check_split_brain()
        with trio.CancelScope(shield=True):
            await self._resync.abandon(peer_id)

    @property
    def _settle_seconds(self) -> float:
        """How young a link may be and still lose to a connection dialled at the same time."""
        return max(1.0, 2 * self._options.link.heartbeat_interval)

    @property
    def _fresh_seconds(self) -> float:
        """How recently a link's peer must have spoken for the link to count as alive."""
        return max(2.0, 3 * self._options.link.heartbeat_interval)


def _role_of(hello: Hello) -> str:
    for capability in hello.capabilities:
        if capability.startswith("role:"):
            return capability.removeprefix("role:")
    return "peer"
