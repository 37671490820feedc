"""The client commands as an operator meets them: `nexus token`, `seed`, `health`
and `reconcile`, run as subprocesses of the virtualenv's `nexus` (the bench:
tests/operations/test_bench.py).

What goes wrong is one line on stderr and a non-zero exit, never a traceback;
nothing is created or written by a command that fails.
Every server is on 127.0.0.1; every subprocess has a timeout.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import jwt

from nexus.server import NexusServer

from support.databases import scratch_database
from support.processes import nexus_env, run_nexus
from support.rpc import JWT_SECRET
from support.servers import free_port

# --- token ------------------------------------------------------------------------


async def test_token_from_a_data_dir_that_does_not_exist_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "never-served"
    run = await run_nexus("token", "--sub", "alice", env=nexus_env(NEXUS_DATA_DIR=data_dir))
    assert run.code != 0
    assert "no JWT secret" in run.error_line and str(data_dir) in run.error_line
    assert run.stdout == ""
    assert not data_dir.exists()


async def test_token_with_an_external_database_and_no_secret_is_an_error() -> None:
    run = await run_nexus("token", "--sub", "alice", env=nexus_env(NEXUS_DATABASE_URL="postgresql://127.0.0.1:1/x"))
    assert run.code != 0
    assert "NEXUS_JWT_SECRET" in run.error_line
    assert run.stdout == ""


async def test_token_ttl_must_be_positive() -> None:
    for ttl in ("-5", "0"):
        run = await run_nexus("token", "--sub", "alice", "--ttl", ttl, env=nexus_env(NEXUS_JWT_SECRET=JWT_SECRET))
        assert run.code != 0, (ttl, run.output)
        assert "--ttl must be a positive number of seconds" in run.error_line
        assert run.stdout == ""


async def test_token_lives_for_its_ttl() -> None:
    run = await run_nexus("token", "--sub", "alice", "--ttl", "90", env=nexus_env(NEXUS_JWT_SECRET=JWT_SECRET))
    assert run.code == 0, run.output
    claims = jwt.decode(run.stdout.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 90


# --- client commands with the server down or refusing -----------------------------


async def test_seed_and_health_with_the_server_down_print_one_line() -> None:
    port = free_port()
    for command in ("seed", "health"):
        run = await run_nexus(command, "--port", str(port), env=nexus_env(NEXUS_JWT_SECRET=JWT_SECRET))
        assert run.code == 1, (command, run.output)
        line = run.error_line
        assert line.startswith(f"nexus: cannot reach 127.0.0.1:{port} (UNAVAILABLE"), line
        assert "nexus serve" in line


async def test_seed_with_a_foreign_secret_prints_the_rpc_error_in_one_line(
    server: NexusServer, db: asyncpg.Connection
) -> None:
    env = nexus_env(NEXUS_JWT_SECRET="not-the-server-secret-" + "y" * 32)
    run = await run_nexus("seed", "--port", str(server.port), env=env)
    assert run.code == 1, run.output
    assert run.error_line.startswith(f"nexus: 127.0.0.1:{server.port}: UNAUTHENTICATED: "), run.error_line
    assert await db.fetchval("SELECT count(*) FROM entries") == 0


async def test_seed_through_a_running_server(server: NexusServer, db: asyncpg.Connection) -> None:
    run = await run_nexus("seed", "--port", str(server.port), env=nexus_env(NEXUS_JWT_SECRET=JWT_SECRET))
    assert run.code == 0, run.output
    assert await db.fetchval("SELECT count(*) FROM entries WHERE author_id = 'alice'") > 0


async def test_reconcile_of_a_data_dir_that_does_not_exist_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "never-served"
    run = await run_nexus("reconcile", env=nexus_env(NEXUS_DATA_DIR=data_dir))
    assert run.code == 1
    assert f"no data directory {data_dir}" in run.error_line
    assert not data_dir.exists()



async def test_reconcile_of_a_database_never_migrated_prints_one_line(pg_admin_url: str) -> None:
    """A command the database fails (here: no tables) names the error in one line, exit 1, no traceback."""
    async with scratch_database(pg_admin_url, "nexus_never_migrated") as url:
        run = await run_nexus("reconcile", env=nexus_env(NEXUS_DATABASE_URL=url, NEXUS_JWT_SECRET=JWT_SECRET))
    assert run.code == 1, run.output
    assert "Traceback" not in run.stderr, run.output
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("nexus: the database failed the command (SQLSTATE 42883): function reconcile_"), run.output


# --- migrate ----------------------------------------------------------------------


async def test_serve_without_a_token_key_or_a_reachable_database_prints_one_line() -> None:
    """With one worker and with several: the cause in the last line, exit 1, no traceback."""
    unreachable = "postgresql://nexus@127.0.0.1:1/nexus"
    for workers in ("1", "2"):
        no_key = nexus_env(NEXUS_DATABASE_URL=unreachable, NEXUS_WORKERS=workers, NEXUS_PORT=str(free_port()))
        no_database = {**no_key, "NEXUS_JWT_SECRET": JWT_SECRET}
        for env, expected in (
            (no_key, "nexus: configuration error: no token key configured: set NEXUS_JWT_SECRET"),
            (no_database, "nexus: cannot connect to the database: "),
        ):
            run = await run_nexus("serve", env=env)
            assert run.code == 1, (workers, run.output)
            assert "Traceback" not in run.stderr, run.output
            assert run.stderr.strip().splitlines()[-1].startswith(expected), run.output


async def test_migrate_and_serve_on_a_database_of_the_old_layout_print_one_line(pg_admin_url: str) -> None:
    """A database migrated before the baseline schema: one line saying how to start fresh, exit 1, nothing written."""
    async with scratch_database(pg_admin_url, "nexus_old_layout") as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                """CREATE TABLE schema_migrations (name text PRIMARY KEY, checksum text NOT NULL,
                                                   applied_time timestamptz NOT NULL DEFAULT now());
                   INSERT INTO schema_migrations (name, checksum) VALUES ('0001_interactions.sql', 'x')"""
            )
            env = nexus_env(NEXUS_DATABASE_URL=url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=str(free_port()))
            for command in ("migrate", "serve"):
                run = await run_nexus(command, env=env)
                assert run.code == 1, run.output
                # serve logs its stop before the line; no traceback either way
                last = run.stderr.strip().splitlines()[-1]
                assert "Traceback" not in run.stderr, run.output
                assert last.startswith("nexus: this database predates the baseline schema"), run.output
                assert "new data directory" in last
            tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            assert tables == 1  # schema_migrations alone
        finally:
            await conn.close()
