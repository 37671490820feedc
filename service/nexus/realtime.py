"""Realtime delivery: one LISTEN connection per process feeds every stream.

The source of truth is the durable event log (``memory_events``, written in the
transaction of each change and numbered per user 1, 2, 3 ... in commit order,
see db/functions/streams.sql). NOTIFY is only a wake-up hint naming the user: it
is lost while the listener is disconnected, so after every reconnect the hub
re-reads the log from each feed's cursor, and streams never depend on a hint
arriving.

The hub keeps one ``_Feed`` per user with open streams: a cursor (the last
event number it read) and the streams' ``_Subscription`` buffers. On a hint it
reads the new events of every hinted user in one query and offers each to the
user's subscriptions. A buffer is bounded; when it is full the event is
dropped and the subscription marked, and the stream serves itself from the
log instead, so a slow consumer costs a bounded amount of memory and still
misses nothing.

This module owns the whole stream protocol; a servicer uses it through
``EventHub.events`` (a user's events after a position, in order, for as long
as the stream runs) and ``EventHub.broadcasts``. ``events`` subscribes, reads
where the log stands, catches up from the log, then serves live events until
a gap (a dropped event, or one that committed before the feed started), which
it fills from the log again.

Broadcasts are ephemeral: a NOTIFY on another channel, fanned out to the
user's broadcast subscriptions on every replica, dropped when a buffer is full.

On a Citus cluster a user's events are written on the worker that owns the
user, and a NOTIFY fires only on the node where it is sent: the hub listens
on the coordinator (broadcasts, and events of a coordinator without workers)
and on every active primary worker of ``pg_dist_node``, all feeding the same
hints. Each node's listener lives on its own: one that loses its connection
reconnects by itself (hints sent meanwhile are lost, so on reconnecting it
re-reads every feed), and the others keep delivering, so a worker that is
down stops the streams of its users only. The node list is checked every
``NODE_CHECK_S``: a worker added gets a listener, a worker removed loses
its. Reads stay on the coordinator; a read of many users that fails (one of
their workers is down) is retried user by user, so the users on healthy
workers still get their events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from nexus import distribution, queries
from nexus.constants import BROADCASTS_CHANNEL, EVENTS_CHANNEL
from nexus.database import Database
from nexus.errors import FailedPrecondition, InvalidArgument, NexusError, Unavailable

log = logging.getLogger("nexus.realtime")

# Events read per user per query, by the hub and by a stream catching up.
READ_BATCH = 256
# Users whose events the hub reads in one query.
USERS_PER_READ = 1000
# Reads of one user each at once, after a read of many failed (a stalled worker
# holds its users' reads until the statement timeout, not the others').
SINGLE_USER_READS = 4
RECONNECT_DELAYS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# Often enough that a stream of a user whose shard moves to a new worker stays live.
NODE_CHECK_S = 1.0


class _Subscription:
    """One stream's bounded buffer of what the hub offers it."""

    __slots__ = ("_buffer", "_capacity", "_ready", "overflowed", "closed")

    def __init__(self, capacity: int) -> None:
        self._buffer: collections.deque[Any] = collections.deque()
        self._capacity = capacity
        self._ready = asyncio.Event()
        # Set when an offer was dropped; cleared by the reader (EventStream,
        # EventHub.broadcasts) once it has made up for the drop.
        self.overflowed = False
        self.closed = False

    def offer(self, item: Any) -> None:
        if len(self._buffer) >= self._capacity:
            self.overflowed = True
        else:
            self._buffer.append(item)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self) -> Any | None:
        """The next buffered item; None once the buffer is drained after a drop.
        Raises Unavailable when the server shuts down."""
        while True:
            if self.closed:
                raise Unavailable("the server is shutting down; reconnect and resume", nothing_written=True)
            if self._buffer:
                return self._buffer.popleft()
            if self.overflowed:
                return None
            self._ready.clear()
            await self._ready.wait()


class _Feed:
    __slots__ = ("cursor", "subscriptions", "hinted")

    def __init__(self) -> None:
        # The last event number the hub has read; None until a stream has
        # read where the user's log stands (start_feed).
        self.cursor: int | None = None
        self.subscriptions: set[_Subscription] = set()
        self.hinted = False


class EventHub:
    def __init__(self, url: str, db: Database, buffer_events: int) -> None:
        self._url = url
        self._db = db
        self._buffer_events = buffer_events
        self._feeds: dict[str, _Feed] = {}
        self._broadcasts: dict[str, set[_Subscription]] = {}
        self._hinted: set[str] = set()
        self._wake = asyncio.Event()
        # A listener per node, by its URL: the coordinator's, then one per worker.
        self._listeners: dict[str, _Listener] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listens on the coordinator (raising if it cannot) and on every worker
        (in the background: a worker that is down does not keep the server from starting)."""
        channels = {EVENTS_CHANNEL: self._on_event_hint, BROADCASTS_CHANNEL: self._on_broadcast}
        coordinator = _Listener(self._url, "coordinator", channels, self._hint_every_feed)
        await coordinator.connect()
        self._listeners[self._url] = coordinator
        coordinator.start(connected=True)
        await self._listen_on_workers()
        self._spawn(self._deliver())
        self._spawn(self._watch_nodes())

    async def close(self) -> None:
        """Ends every stream (they end with UNAVAILABLE) and the listener."""
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for feed in self._feeds.values():
            for subscription in feed.subscriptions:
                subscription.close()
        for subscriptions in self._broadcasts.values():
            for subscription in subscriptions:
                subscription.close()
        for listener in self._listeners.values():
            await listener.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the listeners ----------------------------------------------------------

    async def _listen_on_workers(self) -> None:
        """Starts a listener on each worker that has none, and stops those of workers gone."""
        async with self._db.pool.acquire() as conn:
            workers = await distribution.worker_urls(conn, self._url)
        for url, listener in list(self._listeners.items()):
            if url != self._url and url not in workers:
                log.info("event=cluster_node_removed node=%s", listener.name)
                del self._listeners[url]
                await listener.close()
        for url in workers:
            if url not in self._listeners:
                parts = urlsplit(url)
                name = f"{parts.hostname}:{parts.port}"
                log.info("event=listening node=%s", name)
                self._listeners[url] = listener = _Listener(
                    url, name, {EVENTS_CHANNEL: self._on_event_hint}, self._hint_every_feed
                )
                listener.start(connected=False)

    async def _watch_nodes(self) -> None:
        """Follows the cluster's workers as they are added and removed."""
        while True:
            await asyncio.sleep(NODE_CHECK_S)
            try:
                await self._listen_on_workers()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("event=node_check_failed error=%r", exc)

    def unreachable_nodes(self) -> list[str]:
        """The nodes (host:port) whose listener is not connected now: their users' streams wait."""
        return sorted(listener.name for listener in self._listeners.values() if not listener.connected)

    def _hint_every_feed(self) -> None:
        """Hints sent while a listener was away are lost: every feed is read again."""
        for user_id in self._feeds:
            self._hint(user_id)

    def _on_event_hint(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._hint(payload.partition(" ")[0])

    def _hint(self, user_id: str) -> None:
        feed = self._feeds.get(user_id)
        if feed is None:
            return
        feed.hinted = True
        if feed.cursor is not None:
            self._hinted.add(user_id)
            self._wake.set()

    def _on_broadcast(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
            subscriptions = self._broadcasts.get(message["user_id"], ())
        except (ValueError, KeyError, TypeError):
            log.warning("event=bad_broadcast payload_bytes=%d", len(payload))
            return
        for subscription in subscriptions:
            subscription.offer(message)

    # -- streams ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def events(self, user_id: str, after: int | None) -> AsyncIterator[EventStream]:
        """The user's events after event number ``after`` (None: from now on),
        for as long as the block runs. On entry the stream is registered and its
        start known (``EventStream.position``: a stream announces it before the
        first event); iterating it yields every later event once, in order.

        Raises InvalidArgument (resume_token) for a position ahead of the log,
        and FailedPrecondition RESUME_TOKEN_EXPIRED for one whose next events
        retention has removed."""
        with self._subscribe(user_id) as subscription:
            # Registered before the read: every event committed after it hints this feed.
            row = await self._db.fetchone(queries.MEMORY_STREAM_POSITION, user_id)
            self._start_feed(user_id, row["last_event_seq"])
            if after is None:
                after = row["last_event_seq"]
            elif after > row["last_event_seq"]:
                raise InvalidArgument("resume_token", "ahead of this user's events (from another database?)")
            elif after < row["purged_event_seq"]:
                raise _past_retention()
            yield EventStream(self._db, user_id, subscription, after)

    @contextlib.asynccontextmanager
    async def broadcasts(self, user_id: str) -> AsyncIterator[AsyncIterator[Mapping[str, Any]]]:
        """The user's broadcasts published while the block runs, at most once:
        one that arrives while the stream's buffer is full is dropped."""
        with self._subscribe_broadcasts(user_id) as subscription:
            yield _broadcasts(subscription)

    # -- feeds ----------------------------------------------------------------

    @contextlib.contextmanager
    def _subscribe(self, user_id: str) -> Iterator[_Subscription]:
        """Registers a stream of the user's events for as long as the block runs.
        Register before reading the log, then call _start_feed."""
        subscription = _Subscription(self._buffer_events)
        feed = self._feeds.get(user_id)
        if feed is None:
            feed = self._feeds[user_id] = _Feed()
        feed.subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            feed.subscriptions.discard(subscription)
            if not feed.subscriptions and self._feeds.get(user_id) is feed:
                del self._feeds[user_id]

    def _start_feed(self, user_id: str, last_event_seq: int) -> None:
        """Tells the hub where the user's log stood when read after _subscribe:
        every later event commits after that read, so its hint reaches a
        registered feed and the hub reads it from here."""
        feed = self._feeds[user_id]
        if feed.cursor is None:
            feed.cursor = last_event_seq
            if feed.hinted:
                self._hint(user_id)

    @contextlib.contextmanager
    def _subscribe_broadcasts(self, user_id: str) -> Iterator[_Subscription]:
        subscription = _Subscription(self._buffer_events)
        subscriptions = self._broadcasts.setdefault(user_id, set())
        subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            subscriptions.discard(subscription)
            if not subscriptions and self._broadcasts.get(user_id) is subscriptions:
                del self._broadcasts[user_id]

    async def _deliver(self) -> None:
        """Reads the events of hinted users and offers them to their streams."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            users = [u for u in self._hinted if u in self._feeds]
            self._hinted.clear()
            for start in range(0, len(users), USERS_PER_READ):
                await self._read(users[start:start + USERS_PER_READ])

    async def _read(self, hinted: list[str]) -> None:
        # Feeds may have closed while earlier reads ran.
        feeds = {u: f for u in hinted if (f := self._feeds.get(u)) is not None and f.cursor is not None}
        for hinted_feed in feeds.values():
            hinted_feed.hinted = False
        users = list(feeds)
        try:
            rows = await self._db.fetch(
                queries.MEMORY_EVENTS_AFTER, users, [f.cursor for f in feeds.values()], READ_BATCH
            )
        except NexusError as exc:
            log.warning("event=hub_read_failed users=%d error=%r", len(users), exc)
            if len(users) > 1:  # one of their workers may be down: the others' users still get their events
                reads = asyncio.Semaphore(SINGLE_USER_READS)

                async def read_alone(user_id: str) -> None:
                    async with reads:
                        await self._read([user_id])

                await asyncio.gather(*(read_alone(user_id) for user_id in users))
            elif users:  # read again later, without holding up the other users' reads
                asyncio.get_running_loop().call_later(RECONNECT_DELAYS_S[2], self._hint, users[0])
            return
        read: collections.Counter[str] = collections.Counter()
        for row in rows:
            user_id = row["user_id"]
            read[user_id] += 1
            feed = self._feeds.get(user_id)
            if feed is None or feed.cursor is None or row["seq"] <= feed.cursor:
                continue
            feed.cursor = row["seq"]
            for subscription in feed.subscriptions:
                subscription.offer(row)
        for user_id, count in read.items():
            if count == READ_BATCH:  # more to read
                self._hint(user_id)


class _Listener:
    """LISTEN on one node's channels, reconnecting by itself whenever its
    connection is lost; ``on_connected`` runs on every (re)connection."""

    def __init__(self, url: str, name: str, channels: Mapping[str, Callable[..., None]],
                 on_connected: Callable[[], None]) -> None:
        self._url = url
        self.name = name
        self._channels = channels
        self._on_connected = on_connected
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def connect(self) -> None:
        conn = await asyncpg.connect(self._url, server_settings={"application_name": "nexus-hub"})
        self._lost.clear()
        conn.add_termination_listener(lambda _conn: self._lost.set())
        try:
            for channel, callback in self._channels.items():
                await conn.add_listener(channel, callback)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._lost.is_set()

    def start(self, *, connected: bool) -> None:
        self._task = asyncio.create_task(self._run(connected))

    async def _run(self, connected: bool) -> None:
        attempt = 0
        while not self._closing:
            if connected:
                if attempt:
                    log.info("event=listener_reconnected node=%s attempts=%d", self.name, attempt)
                self._on_connected()
                attempt = 0
                await self._lost.wait()
                log.warning("event=listener_lost node=%s", self.name)
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1
            try:
                await self.connect()
                connected = True
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                    TimeoutError) as exc:
                connected = False
                log.warning("event=listener_reconnect_failed node=%s attempt=%d error=%r", self.name, attempt, exc)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            # asyncpg can turn the cancellation of a connect into an error of its own (and
            # _run then ends at its loop's check): however the task ends, it has ended.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()


class EventStream:
    """One stream's events of one user, from ``position`` on (see EventHub.events).

    ``position`` is the last event number handled (the log numbers every
    topic in one sequence); an event is yielded only when it is position + 1,
    so nothing is skipped or repeated. The stream reads the log until it has
    nothing newer, then takes live events from the hub until a gap in what the
    hub offers (it dropped events for a full buffer, or they committed before
    the feed started), which it fills from the log.
    """

    def __init__(self, db: Database, user_id: str, subscription: _Subscription, position: int) -> None:
        self._db = db
        self._user_id = user_id
        self._subscription = subscription
        self.position = position

    async def __aiter__(self) -> AsyncIterator[Mapping[str, Any]]:
        while True:
            async for event in self._from_log():
                yield event
            async for event in self._live():
                yield event

    async def _from_log(self) -> AsyncIterator[Mapping[str, Any]]:
        """The events after position in the log, until it has nothing newer."""
        while True:
            self._subscription.overflowed = False  # whatever the hub dropped until now is read here
            events = await self._db.fetch(
                queries.MEMORY_EVENTS_AFTER, [self._user_id], [self.position], READ_BATCH
            )
            for event in events:
                if event["seq"] != self.position + 1:  # the log is gapless but for retention
                    raise _past_retention()
                self.position = event["seq"]
                yield event
            if len(events) < READ_BATCH:
                return

    async def _live(self) -> AsyncIterator[Mapping[str, Any]]:
        """The events the hub offers, until a gap."""
        while (event := await self._subscription.next()) is not None and event["seq"] <= self.position + 1:
            if event["seq"] == self.position + 1:
                self.position = event["seq"]
                yield event


async def _broadcasts(subscription: _Subscription) -> AsyncIterator[Mapping[str, Any]]:
    while True:
        message = await subscription.next()
        if message is None:  # dropped for a full buffer: at most once
            subscription.overflowed = False
            continue
        yield message


def _past_retention() -> FailedPrecondition:
    return FailedPrecondition(
        "RESUME_TOKEN_EXPIRED", "events after this position are past retention; subscribe without a token and reload"
    )
