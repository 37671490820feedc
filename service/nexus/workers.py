"""``nexus serve --workers N``: N server processes on one port.

One Python process keeps one core busy; workers use more of them. The parent
serves no calls itself:

1. It checks the port and reserves it: a socket bound with SO_REUSEPORT but not
   listening, so it takes no connection, holds the port (also the one port 0
   picks) for the workers to bind beside it and for a replacement worker.
2. It starts the embedded database (unless NEXUS_DATABASE_URL is set) and owns
   it as a single server does (nexus.embedded: restarted when it dies, taken
   over when another owner exits), and runs the migrations, once.
3. It spawns the workers (multiprocessing, spawn). Each is a whole NexusServer
   on the database's URL, with its own pool, stream hub, health probe,
   maintenance loop and metrics port (metrics_port + its index), and binds the
   port with SO_REUSEPORT: the kernel splits incoming connections between them.
   When all serve, the parent logs ``event=serving`` as a single server does.
4. A worker that exits while the server runs is replaced; one that cannot start
   (at first, or as a replacement) stops the whole server with exit code 1.
5. On SIGTERM or SIGINT it sends SIGTERM to the workers, waits for them (each
   gives its calls the grace period), kills any still running after the grace
   and a margin, then stops the embedded database.

Workers ignore SIGINT, which a terminal's Ctrl-C sends to all of them: the
parent alone decides when they stop. A worker whose parent has gone (kill -9)
exits at once, as a single server would have died whole: none is left behind
holding the port that the restarted server needs.

Maintenance needs nothing more: every worker ticks, and the advisory locks of
nexus.maintenance let one process at a time do the work, as they do across
replicas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
from multiprocessing.connection import Connection

import asyncpg
import uvloop

from nexus import embedded
from nexus.auth import resolve_secret
from nexus.cli import setup_logging
from nexus.config import Config
from nexus.server import (
    DATABASE_UNREACHABLE,
    ListenError,
    NexusServer,
    StartupError,
    WorkerRole,
    check_port_free,
    make_authenticator,
    migrate_once,
    page_token_key,
)

log = logging.getLogger("nexus.workers")

SPAWN = multiprocessing.get_context("spawn")
# How long a worker may take to close its pool and listener after its grace period.
STOP_MARGIN_S = 5.0
DATABASE_CHECK_INTERVAL_S = 0.5
# Database connections a worker opens besides its pool: its stream listener and its health probe.
CONNECTIONS_BESIDES_POOL = 2


class WorkerFailed(Exception):
    """A worker could not start; the message says which and why."""


async def _readable(fd: int) -> None:
    """Returns once ``fd`` is readable: a message has come, or the other end has closed."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class Worker:
    """One worker process, and the pipe on which it reports whether it serves."""

    def __init__(self, config: Config, role: WorkerRole) -> None:
        self.index = role.index
        reports, sender = SPAWN.Pipe(duplex=False)
        self.process = SPAWN.Process(target=run_worker, args=(config, role, sender), name=f"nexus-worker-{role.index}")
        self.process.start()
        sender.close()  # the worker holds the only sending end: the pipe closes when it exits
        self._reports = reports

    async def serving(self) -> None:
        """Returns once the worker serves; raises WorkerFailed if it fails or exits first."""
        await _readable(self._reports.fileno())
        try:
            failure = self._reports.recv()
        except EOFError:
            failure = f"worker {self.index} exited with code {await self.exited()} before serving"
        finally:
            self._reports.close()
        if failure is not None:
            raise WorkerFailed(failure)

    async def exited(self) -> int:
        """Waits for the process to exit; its exit code (-N: ended by signal N)."""
        await _readable(self.process.sentinel)
        self.process.join()  # reaps it, at once: it has exited
        assert self.process.exitcode is not None
        return self.process.exitcode


def reserve_port(config: Config) -> socket.socket:
    """A socket bound to the server's address with SO_REUSEPORT, not listening."""
    family, kind, proto, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    reservation = socket.socket(family, kind, proto)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind(address)
    except OSError as exc:
        reservation.close()
        raise ListenError(f"cannot listen on {config.listen_address}: {exc}") from None
    return reservation


class Supervisor:
    """The parent of the workers: the port, the database, the workers' lives."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._reservation: socket.socket | None = None
        self._embedded: embedded.EmbeddedPostgres | None = None
        self._worker_config = config
        self._page_token_key = b""
        self._workers: list[Worker] = []

    async def serve(self) -> None:
        """Starts the server, then keeps every worker running; ends only by raising
        (WorkerFailed: a worker could not start) or by being cancelled."""
        await self._start()
        keepers = [asyncio.create_task(self._keep(index)) for index in range(len(self._workers))]
        if self._embedded is not None:
            keepers.append(asyncio.create_task(self._mind_database(self._embedded)))
        try:
            done, _ = await asyncio.wait(keepers, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)

    async def _start(self) -> None:
        config = self.config
        make_authenticator(config)  # a missing token key stops the server before anything starts
        check_port_free(config)
        self._reservation = reserve_port(config)
        port = self._reservation.getsockname()[1]
        if config.embedded:
            # Blocking the event loop on purpose: a SIGTERM meanwhile is handled once the
            # database is up (and then stopped), never while it is half-way started.
            self._embedded = embedded.EmbeddedPostgres.start(config.data_dir)
        url = self._embedded.url if self._embedded else config.database_url
        try:
            await migrate_once(url, config, then=self._warn_if_connections_run_short)
        except DATABASE_UNREACHABLE as exc:
            raise StartupError(f"cannot connect to the database: {exc}") from exc
        self._worker_config = dataclasses.replace(
            config, database_url=url, jwt_secret=resolve_secret(config), port=port, reuse_port=True
        )
        self._page_token_key = page_token_key(config)
        self._workers = [self._spawn(index) for index in range(config.workers)]
        for worker in self._workers:
            await worker.serving()
        log.info("event=serving address=%s port=%d embedded=%s workers=%d",
                 config.host, port, config.embedded, config.workers)

    def _spawn(self, index: int) -> Worker:
        metrics_port = self.config.metrics_port + index if self.config.metrics_port else 0
        config = dataclasses.replace(self._worker_config, metrics_port=metrics_port)
        return Worker(config, WorkerRole(index, self._page_token_key))

    async def _warn_if_connections_run_short(self, conn: asyncpg.Connection) -> None:
        """Pools are per worker: says so when all of them full would pass the database's limit."""
        per_worker = self.config.pool_max_size + CONNECTIONS_BESIDES_POOL
        limit = int(await conn.fetchval("SHOW max_connections"))
        if self.config.workers * per_worker > limit:
            log.warning("event=database_connections_short workers=%d connections_per_worker=%d max_connections=%d",
                        self.config.workers, per_worker, limit)

    async def _keep(self, index: int) -> None:
        """Replaces worker ``index`` whenever it exits; raises WorkerFailed when a replacement cannot start."""
        while True:
            worker = self._workers[index]
            code = await worker.exited()
            log.error("event=worker_exited worker=%d pid=%d exit_code=%d action=restart", index, worker.process.pid, code)
            self._workers[index] = self._spawn(index)
            await self._workers[index].serving()

    async def _mind_database(self, pg: embedded.EmbeddedPostgres) -> None:
        """Restarts the embedded database when it dies, as a single server's health
        probe does, and takes ownership over when its owner has gone."""
        while True:
            await asyncio.sleep(DATABASE_CHECK_INTERVAL_S)
            try:
                await asyncio.to_thread(pg.restart_if_down)
            except Exception as exc:  # retried at the next check
                log.error("event=embedded_postgres_restart_failed error=%r", exc)

    async def stop(self) -> None:
        """SIGTERM to every worker; after the grace period and a margin, SIGKILL to
        those still running; then the port and the embedded database."""
        for worker in self._workers:
            worker.process.terminate()
        exits = asyncio.gather(*(worker.exited() for worker in self._workers))
        try:
            await asyncio.wait_for(exits, self.config.shutdown_grace_s + STOP_MARGIN_S)
        except TimeoutError:
            for worker in self._workers:
                if worker.process.exitcode is None:
                    log.error("event=worker_killed worker=%d pid=%d reason='still running after the grace period'",
                              worker.index, worker.process.pid)
                    worker.process.kill()
            await asyncio.gather(*(worker.exited() for worker in self._workers))
        if self._reservation is not None:
            self._reservation.close()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        log.info("event=stopped")


async def serve_workers(config: Config) -> int:
    """``nexus serve`` with more than one worker; returns the exit code."""
    supervisor = Supervisor(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    serving = asyncio.create_task(supervisor.serve())
    requested = asyncio.create_task(stop_requested.wait())
    failure = None
    try:
        done, _ = await asyncio.wait((serving, requested), return_when=asyncio.FIRST_COMPLETED)
        if serving in done:
            serving.result()  # Supervisor.serve ends only by raising
        log.info("event=shutdown_requested grace_s=%s", config.shutdown_grace_s)
    except (StartupError, WorkerFailed) as exc:
        failure = exc
    finally:
        serving.cancel()
        requested.cancel()
        await asyncio.gather(serving, requested, return_exceptions=True)
        await supervisor.stop()
    if failure is not None:
        print(f"nexus: {failure}", file=sys.stderr)  # after the stop's log lines: the last line says why
        return 1
    return 0


# --- in the worker process --------------------------------------------------------


def run_worker(config: Config, role: WorkerRole, reports: Connection) -> None:
    """A worker process: serves until SIGTERM or until its parent has gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(config.log_level)
    sys.exit(uvloop.run(_serve_worker(config, role, reports)))


async def _serve_worker(config: Config, role: WorkerRole, reports: Connection) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    parent = multiprocessing.parent_process()
    assert parent is not None

    def parent_gone() -> None:
        log.error("event=worker_orphaned worker=%d action=exit", role.index)
        os._exit(1)

    loop.add_reader(parent.sentinel, parent_gone)  # readable once the parent has exited, however it exited
    server = NexusServer(config, role)
    try:
        await server.start()
    except Exception as exc:
        await server.stop(grace=0)
        if not isinstance(exc, StartupError):
            log.exception("event=worker_start_failed worker=%d", role.index)
        reports.send(f"worker {role.index} could not start: {exc}")
        return 1
    reports.send(None)
    await stop.wait()
    await server.stop()
    return 0
