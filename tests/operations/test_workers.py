"""``nexus serve --workers N``: N server processes on one port, one database.

Real ``nexus serve`` processes on 127.0.0.1, real PostgreSQL. Which worker a
call landed on is read from each worker's own /metrics (NEXUS_METRICS_PORT + its
index); each call goes on a TCP connection of its own, since the kernel splits
connections between the workers, not calls. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.processes import (
    announced_port,
    exit_code,
    nexus_env,
    nexus_serve,
    postmaster_pid,
    process_alive,
    wait_until_gone,
    worker_pids,
)
from support.rpc import JWT_SECRET, create_entry
from support.servers import SERVING, free_ports, health_status, own_connection
from support.waiting import eventually

CREATE_ENTRY = ("nexus.v1.InteractionService", "CreateEntry")


def handled_calls(metrics_port: int, service_method: tuple[str, str]) -> float:
    """The calls of one method a worker has answered, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    service, method = service_method
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels["grpc_service"] == service and sample.labels["grpc_method"] == method
    )


async def create_entries_on_own_connections(port: int, count: int) -> None:
    for _ in range(count):
        async with own_connection(port) as channel:
            await create_entry(channel)


async def all_gone(processes: list[psutil.Process]) -> None:
    for process in processes:
        await wait_until_gone(process.pid, f"process {process.pid} of the server to exit", timeout=10)


def port_is_free(port: int) -> bool:
    """Whether a server could take the port now (bound without SO_REUSEPORT, as nexus serve checks)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_workers_share_port_0_and_one_embedded_database_and_all_stop_on_sigterm(
    pg_dir: Path, tmp_path: Path
) -> None:
    metrics = free_ports(2)
    env = nexus_env(NEXUS_DATA_DIR=pg_dir, NEXUS_PORT=0, NEXUS_WORKERS=2, NEXUS_METRICS_PORT=metrics,
                    NEXUS_JWT_SECRET=JWT_SECRET)
    log_file = tmp_path / "nexus.log"
    async with nexus_serve(env, log_file) as proc:
        port = await announced_port(proc, log_file)
        log = log_file.read_text()
        assert f"port={port} embedded=True workers=2" in log, log
        workers = worker_pids(log)
        assert sorted(workers) == [0, 1], log
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert {pids[0] for pids in workers.values()} <= {p.pid for p in tree}
        # The parent alone starts the database and migrates it.
        assert log.count("event=embedded_postgres_ready") == 1 and "owner=True" in log, log
        assert log.count("event=migration_applied name=0001_baseline.sql") == 1, log
        postmaster = postmaster_pid(pg_dir / "pg")
        assert postmaster is not None

        calls = 32  # on 32 connections: all on one worker has odds of 2 in 2**32
        await create_entries_on_own_connections(port, calls)

        async def counted() -> list[float] | None:
            answered = [await asyncio.to_thread(handled_calls, metrics + i, CREATE_ENTRY) for i in range(2)]
            return answered if sum(answered) == calls else None

        answered = await eventually(counted, "both workers' metrics to count the calls")
        assert all(answered), f"every call landed on one worker: {answered}"

        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, 30, log_file) == 0
    await all_gone(tree)
    assert not process_alive(postmaster) and postmaster_pid(pg_dir / "pg") is None
    assert port_is_free(port)


async def test_a_killed_worker_is_replaced_while_the_others_serve(db_url: str, tmp_path: Path) -> None:
    env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=0, NEXUS_WORKERS=2)
    log_file = tmp_path / "nexus.log"
    async with nexus_serve(env, log_file) as proc:
        port = await announced_port(proc, log_file)
        killed = worker_pids(log_file.read_text())[0][0]
        os.kill(killed, signal.SIGKILL)

        async def reaped() -> bool:
            # Not only a zombie: a killed process's other threads may still hold its files
            # (the listening socket among them) after its main thread is a zombie; the
            # supervisor reaps it once every thread has exited and its files are closed.
            return not Path(f"/proc/{killed}").exists()

        await eventually(reaped, "the supervisor to reap the killed worker", timeout=5)
        # New connections go to the listeners left: calls keep succeeding.
        await create_entries_on_own_connections(port, 8)

        async def replaced() -> list[int] | None:
            pids = worker_pids(log_file.read_text())[0]
            return pids if len(pids) == 2 else None

        _, replacement = await eventually(replaced, "a replacement for worker 0", timeout=60)
        log = log_file.read_text()
        assert f"event=worker_exited worker=0 pid={killed} exit_code=-9 action=restart" in log, log
        assert psutil.Process(replacement).ppid() == proc.pid
        assert proc.returncode is None
        await create_entries_on_own_connections(port, 8)

        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, 30, log_file) == 0
    assert not process_alive(replacement)


async def test_a_worker_that_cannot_start_stops_the_server_with_exit_1(db_url: str, tmp_path: Path) -> None:
    metrics = free_ports(2)
    with socket.socket() as taken:  # worker 1's metrics port
        taken.bind(("127.0.0.1", metrics + 1))
        taken.listen()
        env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=0, NEXUS_WORKERS=2,
                        NEXUS_METRICS_PORT=metrics)
        log_file = tmp_path / "nexus.log"
        async with nexus_serve(env, log_file) as proc:
            assert await exit_code(proc, 60, log_file) == 1
    log = log_file.read_text()
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"nexus: worker 1 could not start: cannot serve metrics on 127.0.0.1:{metrics + 1}"), log
    assert "Traceback" not in log, log
    assert "event=serving" not in log
    for pids in worker_pids(log).values():
        assert not any(process_alive(pid) for pid in pids), log
    assert port_is_free(metrics)


async def test_workers_exit_when_their_parent_is_killed(db_url: str, tmp_path: Path) -> None:
    env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=0, NEXUS_WORKERS=2)
    log_file = tmp_path / "nexus.log"
    async with nexus_serve(env, log_file) as proc:
        port = await announced_port(proc, log_file)
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        await proc.wait()
    await all_gone(tree)
    assert port_is_free(port), "a worker outlived its parent on the port"


async def test_one_worker_is_one_process(db_url: str, tmp_path: Path) -> None:
    env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=0, NEXUS_WORKERS=1)
    log_file = tmp_path / "nexus.log"
    async with nexus_serve(env, log_file) as proc:
        port = await announced_port(proc, log_file)
        assert psutil.Process(proc.pid).children() == []
        assert f"event=serving address=127.0.0.1 port={port} embedded=False\n" in log_file.read_text()
        async with own_connection(port) as channel:
            assert await health_status(channel) == SERVING
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, 30, log_file) == 0


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
async def test_workers_stop_on_sigterm_and_on_ctrl_c_without_a_restart(db_url: str, tmp_path: Path, ctrl_c: bool) -> None:
    """SIGTERM reaches the parent alone; a terminal's Ctrl-C sends SIGINT to every process at once."""
    env = nexus_env(NEXUS_DATABASE_URL=db_url, NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_PORT=0, NEXUS_WORKERS=2)
    log_file = tmp_path / "nexus.log"
    async with nexus_serve(env, log_file) as proc:
        await announced_port(proc, log_file)
        tree = psutil.Process(proc.pid).children(recursive=True)
        if ctrl_c:
            for process in (proc, *tree):
                os.kill(process.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, 30, log_file) == 0
    await all_gone(tree)
    assert "event=worker_exited" not in log_file.read_text()
