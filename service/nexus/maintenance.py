"""Periodic upkeep, run inside the service (no pg_cron needed).

Every replica ticks every ``maintenance_interval_s``; the stored function
``run_maintenance`` takes an advisory lock and records its last run, so one
replica at a time does the work and each job runs at most once per interval
across all of them. Jobs: the seed's cache cleanup, event-log retention,
expiry of old CreateMemory request ids, and arcs going dormant.

Pending transfers whose timeout has passed are voided on a tick of their own,
``pending_expiry_interval_s`` (a quarter of a second by default), by every replica:
``expire_pending_transfers`` voids them soonest first and each exactly once
(it checks each one's status under its row lock), so a reservation expires
within a tick of its time however many replicas run.

Then the vector-index job: a user with more than ``search_exact_max_memories``
memories gets an IVFFlat index of their own (see db/functions/search.sql),
rebuilt when they outgrow its lists, for the ``vector_index_max_users``
largest such users (memory_vector_indexes_due); the index of a user no
longer among them is dropped. Built and dropped CONCURRENTLY so that user's writes
go on meanwhile (which is why it runs here and not inside the stored function:
a concurrent build cannot run in a transaction). One replica at a time builds,
under a session advisory lock.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

import asyncpg

from nexus import queries
from nexus.config import Config
from nexus.constants import VECTOR_INDEX_LOCK_KEY
from nexus.database import Database
from nexus.errors import NexusError

log = logging.getLogger("nexus.maintenance")

CACHE_TTL = datetime.timedelta(hours=24)
ARC_DORMANT_AFTER = datetime.timedelta(days=7)
# Rows one job removes per run, so no run holds its locks for long.
BATCH = 10_000
# Pending transfers one expiry sweep voids in one transaction (it locks their
# users' balance rows; about 0.1 s of work): a backlog is swept batch after
# batch without a pause, and what falls due meanwhile waits one batch, not a
# whole backlog.
EXPIRY_BATCH = 200
# IVFFlat's k-means sample must fit in maintenance_work_mem (a 100k-memory
# user of 384-dim halfvecs needs well under 100 MB).
VECTOR_INDEX_BUILD_MEMORY = "512MB"
# Feed activities one trim removes in one transaction, each with its copies in
# up to feed_broadcast_followers() feeds: at most about 100k rows.
FEED_TRIM_BATCH = 100


class Maintenance:
    def __init__(self, db: Database, config: Config) -> None:
        self._db = db
        self._interval = datetime.timedelta(seconds=config.maintenance_interval_s)
        self._expiry_interval_s = config.pending_expiry_interval_s
        self._event_retention = datetime.timedelta(hours=config.event_retention_hours)
        self._feed_retention = datetime.timedelta(days=config.feed_retention_days)
        self._request_retention = datetime.timedelta(hours=config.idempotency_retention_hours)
        self._exact_search_max = config.search_exact_max_memories
        self._vector_index_max_users = config.vector_index_max_users
        self._capped_logged = 0  # the users above the threshold when vector_indexes_capped was last logged

    async def run_once(self) -> dict[str, int]:
        """Runs the jobs if this replica gets the lock and they are due; returns
        rows affected per job (empty: not this replica's turn)."""
        rows = await self._db.fetch(
            queries.RUN_MAINTENANCE,
            self._interval,
            self._event_retention,
            self._request_retention,
            CACHE_TTL,
            ARC_DORMANT_AFTER,
            BATCH,
        )
        done = {row["job"]: row["affected"] for row in rows}
        if done:
            log.info("event=maintenance %s", " ".join(f"{job}={n}" for job, n in done.items()))
        return done

    async def maintain_vector_indexes(self) -> list[str]:
        """Drops the vector indexes of users no longer chosen, then builds (or
        rebuilds) those due; returns the users built for. Empty when another
        replica holds the job."""
        built: list[str] = []
        async with self._db.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", VECTOR_INDEX_LOCK_KEY):
                return built
            try:
                # Session settings for the builds, reset before the connection goes back to the pool.
                await conn.execute(
                    f"SET statement_timeout = 0; SET maintenance_work_mem = '{VECTOR_INDEX_BUILD_MEMORY}'"
                )
                due_now = await conn.fetch(
                    queries.MEMORY_VECTOR_INDEXES_DUE.sql, self._exact_search_max, self._vector_index_max_users
                )
                for due in due_now:
                    started = time.perf_counter()
                    for statement in due["statements"]:
                        await conn.execute(statement)
                    log.info(
                        "event=vector_index_%s index=%s user_id=%s duration_s=%.1f",
                        due["action"], due["index_name"], due["user_id"], time.perf_counter() - started,
                    )  # fmt: skip
                    if due["action"] != "drop":
                        built.append(due["user_id"])
                above = await conn.fetchval(queries.MEMORY_USERS_ABOVE.sql, self._exact_search_max)
                capped = above if above > self._vector_index_max_users else 0
                if capped and capped != self._capped_logged:  # once per change, not once a minute
                    log.warning(
                        "event=vector_indexes_capped users_above_exact_max=%d vector_index_max_users=%d",
                        above, self._vector_index_max_users,
                    )  # fmt: skip
                self._capped_logged = capped
            finally:
                await conn.execute("RESET statement_timeout; RESET maintenance_work_mem")
                await conn.execute("SELECT pg_advisory_unlock($1)", VECTOR_INDEX_LOCK_KEY)
        return built

    async def trim_feeds(self) -> int:
        """Removes the feed activities older than the feed's reach, with their copies in readers' feeds,
        oldest first in batches; returns how many activities."""
        trimmed = 0
        while True:
            removed = await self._db.fetchval(queries.TRIM_FEEDS, self._feed_retention, FEED_TRIM_BATCH)
            trimmed += removed
            if removed < FEED_TRIM_BATCH:
                if trimmed:
                    log.info("event=feeds_trimmed activities=%d", trimmed)
                return trimmed

    async def expire_pending_transfers(self) -> int:
        """Voids the pending transfers whose timeout has passed, soonest first; returns how many."""
        expired = 0
        while True:
            swept = await self._db.fetchval(queries.EXPIRE_PENDING_TRANSFERS, EXPIRY_BATCH)
            expired += swept
            if swept < EXPIRY_BATCH:
                if expired:
                    log.info("event=pending_transfers_expired count=%d", expired)
                return expired

    async def expire_forever(self) -> None:
        """Sweeps on a fixed tick (a slow sweep does not push the next one back by a whole interval)."""
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            tick = max(tick + self._expiry_interval_s, loop.time())
            await asyncio.sleep(tick - loop.time())
            try:
                await self.expire_pending_transfers()
            except NexusError as exc:
                log.warning("event=pending_expiry_failed error=%r", exc)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval.total_seconds())
            try:
                await self.run_once()
            except NexusError as exc:
                log.warning("event=maintenance_failed error=%r", exc)
            try:
                await self.trim_feeds()
            except NexusError as exc:
                log.warning("event=feed_trim_failed error=%r", exc)
            try:
                await self.maintain_vector_indexes()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                log.warning("event=vector_index_failed error=%r", exc)
