"""Periodic upkeep, run inside the service (no pg_cron needed).

Every replica ticks every ``maintenance_interval_s``; the stored function
``run_maintenance`` takes an advisory lock and records its last run, so one
replica at a time does the work and each job runs at most once per interval
across all of them. Jobs: the seed's cache cleanup, event-log retention,
expiry of old CreateMemory request ids, and arcs going dormant.
"""

from __future__ import annotations

import asyncio
import datetime
import logging

from nexus import queries
from nexus.config import Config
from nexus.database import Database
from nexus.errors import NexusError

log = logging.getLogger("nexus.maintenance")

CACHE_TTL = datetime.timedelta(hours=24)
ARC_DORMANT_AFTER = datetime.timedelta(days=7)
# Rows one job removes per run, so no run holds its locks for long.
BATCH = 10_000


class Maintenance:
    def __init__(self, db: Database, config: Config) -> None:
        self._db = db
        self._interval = datetime.timedelta(seconds=config.maintenance_interval_s)
        self._event_retention = datetime.timedelta(hours=config.event_retention_hours)
        self._request_retention = datetime.timedelta(hours=config.idempotency_retention_hours)

    async def run_once(self) -> dict[str, int]:
        """Runs the jobs if this replica gets the lock and they are due; returns
        rows affected per job (empty: not this replica's turn)."""
        rows = await self._db.fetch(
            "run_maintenance",
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

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval.total_seconds())
            try:
                await self.run_once()
            except NexusError as exc:
                log.warning("event=maintenance_failed error=%r", exc)
