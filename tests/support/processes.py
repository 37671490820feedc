"""Subprocesses: the nexus command and ``nexus serve``, Python snippets, and the
embedded PostgreSQL's postmaster (crashed, waited for, restarted from outside)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.waiting import eventually


def nexus_env(**values: object) -> dict[str, str]:
    """The environment without any inherited NEXUS_* setting, plus ``values``; a server
    started with it is one process unless ``values`` asks for workers (the default,
    the machine's cores, would make a test's processes depend on the machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_WORKERS"] = "1"
    env.update({k: str(v) for k, v in values.items()})
    return env


async def run_python(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, str, str]:
    """Runs ``python <args>`` to completion (killed after ``timeout``); returns (exit code, stdout, stderr)."""
    return await run_program(sys.executable, *args, env=env, timeout=timeout)


async def run_program(
    program: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> tuple[int, str, str]:
    """Runs ``program <args>`` to completion (killed after ``timeout``); returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        program, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Runs ``nexus <args>``; returns (exit code, stdout + stderr)."""
    code, stdout, stderr = await run_python("-m", "nexus.cli", *args, env=env, timeout=30)
    return code, stdout + stderr


@contextlib.asynccontextmanager
async def nexus_serve(env: dict[str, str], log_file: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``nexus serve`` as a subprocess (stderr to ``log_file``); killed on exit if still running."""
    with log_file.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nexus.cli", "serve", env=env, stdout=log, stderr=log
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def announced_port(proc: asyncio.subprocess.Process, log_file: Path, timeout: float = 60.0) -> int:
    """The port of ``nexus serve``'s ``event=serving`` line (logged once every worker serves)."""

    async def port() -> int | None:
        if proc.returncode is not None:
            pytest.fail(f"nexus exited with code {proc.returncode} before serving; its log:\n{log_file.read_text()}")
        found = re.search(r"event=serving address=\S+ port=(\d+)", log_file.read_text())
        return int(found.group(1)) if found else None

    return await eventually(port, "nexus serve to log event=serving", timeout)


def worker_pids(log_text: str) -> dict[int, list[int]]:
    """Each worker's processes, in the order they logged ``event=worker_serving``."""
    pids: dict[int, list[int]] = {}
    for index, pid in re.findall(r"event=worker_serving worker=(\d+) pid=(\d+)", log_text):
        pids.setdefault(int(index), []).append(int(pid))
    return pids


async def exit_code(proc: asyncio.subprocess.Process, timeout: float, log_file: Path) -> int:
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        pytest.fail(f"nexus did not exit within {timeout} s; its log:\n{log_file.read_text()}")


def postmaster_pid(pgdata: Path) -> int | None:
    pid_file = pgdata / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


def process_alive(pid: int) -> bool:
    """Running, not a zombie (the postmaster is re-parented to a PID 1 that may not reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def wait_until_gone(pid: int, what: str, timeout: float) -> None:
    async def gone() -> bool:
        return not process_alive(pid)

    await eventually(gone, what, timeout)


def kill_postmaster(pgdata: Path) -> int:
    """Crashes the PostgreSQL of ``pgdata``: SIGKILL to its postmaster; returns the pid."""
    pid = postmaster_pid(pgdata)
    assert pid is not None, f"no postmaster on {pgdata}"
    os.kill(pid, signal.SIGKILL)
    return pid


async def stop_leftover_postmaster(pgdata: Path) -> None:
    """Cleanup after a failed test: fast-shuts-down a postmaster still running on ``pgdata``."""
    pid = postmaster_pid(pgdata)
    if pid is None or not process_alive(pid):
        return
    os.kill(pid, signal.SIGINT)
    await wait_until_gone(pid, f"postmaster {pid} to stop", timeout=20)


async def start_embedded_elsewhere(data_dir: Path) -> str:
    """Starts the embedded PostgreSQL of ``data_dir`` from another process (as an operator
    restarting the database would); returns its URL."""
    script = (
        "import sys; from pathlib import Path; from nexus.embedded import EmbeddedPostgres; "
        "print(EmbeddedPostgres.start(Path(sys.argv[1])).url)"
    )
    code, stdout, stderr = await run_python("-c", script, str(data_dir))
    assert code == 0, stderr
    return stdout.strip().splitlines()[-1]


NEXUS = str(Path(sys.executable).with_name("nexus"))  # the installed command, beside the interpreter


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """Both streams, for failure messages."""
        return f"exit code {self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"

    @property
    def error_line(self) -> str:
        """The one line a failing command prints on stderr (fails the test if there are more)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.stderr}"
        return lines[0]


async def run_nexus(*args: str, env: dict[str, str], timeout: float = 60.0) -> Run:
    """Runs `nexus <args>` (the installed command) to completion (killed after `timeout`)."""
    return Run(*await run_program(NEXUS, *args, env=env, timeout=timeout))
