"""What every suite measures with: timed scenarios, pgbench, CPU counters, the report.

A figure is only worth printing when every call behind it succeeded, so the
suites add their lines to a :class:`Report` that is printed once, at the end of
a run without failures; what goes wrong raises :class:`BenchFailed` instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from nexus import embedded


class BenchFailed(Exception):
    """The run cannot give trustworthy figures; the message says which phase and why."""

    def __str__(self) -> str:
        return f"bench failed: {self.args[0]}"


def progress(message: str) -> None:
    """What the bench is doing, on stderr: the figures come on stdout at the end."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass
class Report:
    """The lines a run prints on stdout once it has finished without a failure."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def print(self) -> None:
        print("\n".join(self.lines), flush=True)


# --- CPU ---------------------------------------------------------------------------


def _cpu_s(process: psutil.Process, with_children: bool = False) -> float:
    times = process.cpu_times()
    total = times.user + times.system
    if with_children:
        total += times.children_user + times.children_system
    return float(total)


@dataclass(frozen=True)
class Processes:
    """The processes a figure's CPU is read from: the server's, and every PostgreSQL
    node's (a postmaster with its backends and the ones that have exited)."""

    server_pid: int | None
    pgdata_dirs: tuple[Path, ...]

    def cpu_seconds(self) -> tuple[float | None, float | None]:
        """CPU used so far by (the server, the PostgreSQL nodes); None where not known."""
        server = _server_cpu_s(self.server_pid) if self.server_pid else None
        nodes = [_postgres_cpu_s(pgdata) for pgdata in self.pgdata_dirs]
        postgres = None if not nodes or None in nodes else sum(n for n in nodes if n is not None)
        return server, postgres


def _server_cpu_s(pid: int) -> float | None:
    """The server's CPU so far: its process and its workers (``nexus serve --workers``),
    live or exited; None once the server has gone (its calls fail and say so)."""
    try:
        server = psutil.Process(pid)
        total = 0.0
        for worker in server.children(recursive=True):
            try:
                total += _cpu_s(worker)
            except psutil.NoSuchProcess:
                pass  # reaped meanwhile: its time is in the server's children counters, read below
        return total + _cpu_s(server, with_children=True)
    except psutil.Error:
        return None


def _postgres_cpu_s(pgdata: Path) -> float | None:
    """One node's CPU so far: the live processes, plus the postmaster's exited
    children (their time moves into its counters when it reaps them)."""
    try:
        postmaster = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
        total = 0.0
        for child in postmaster.children():
            try:
                total += _cpu_s(child)
            except psutil.NoSuchProcess:
                pass  # reaped meanwhile: its time is in the postmaster's children counters, read below
        return total + _cpu_s(postmaster, with_children=True)
    except (OSError, ValueError, psutil.Error):
        return None


@dataclass(frozen=True)
class CpuPerCall:
    """Microseconds of CPU per call, read from the processes' counters over the timed window."""

    server_us: float | None
    postgres_us: float | None
    client_us: float

    @property
    def total_us(self) -> float | None:
        parts = (self.server_us, self.postgres_us)
        return None if parts == (None, None) else self.client_us + sum(p for p in parts if p is not None)

    def text(self) -> str:
        def us(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f}"

        return (f"CPU/call µs: server {us(self.server_us)} postgres {us(self.postgres_us)} "
                f"client {us(self.client_us)} total {us(self.total_us)}")


class CpuWindow:
    """CPU counters read at the start and the end of a timed window."""

    def __init__(self, processes: Processes, client: Callable[[], float]) -> None:
        self._processes, self._client = processes, client
        self._server, self._postgres = processes.cpu_seconds()
        self._client_start = client()

    def per_call(self, calls: int) -> CpuPerCall:
        server, postgres = self._processes.cpu_seconds()
        n = max(calls, 1)

        def per(before: float | None, after: float | None) -> float | None:
            return None if before is None or after is None else (after - before) * 1e6 / n

        client_us = (self._client() - self._client_start) * 1e6 / n
        return CpuPerCall(per(self._server, server), per(self._postgres, postgres), client_us)


def own_cpu_s() -> float:
    """This process's CPU (the load client of the RPC scenarios)."""
    return _cpu_s(psutil.Process())


def children_cpu_s() -> float:
    """CPU of this process's exited children (pgbench, once it has been waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- figures -----------------------------------------------------------------------


@dataclass
class Figures:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu: CpuPerCall
    max_ms: float = 0.0

    def line(self) -> str:
        return f"{self.name:<38} {self.values()}"

    def values(self) -> str:
        return (f"{self.rps:>8.0f} rps   p50 {self.p50_ms:>7.2f} ms   p99 {self.p99_ms:>7.2f} ms   "
                + self.cpu.text())


def percentiles(samples: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 of the samples (0 for none)."""
    if len(samples) < 2:
        return (samples[0], samples[0]) if samples else (0.0, 0.0)
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49], cuts[98]


Call = Callable[[], Awaitable[object]]


async def measure(
    name: str, call: Call | Sequence[Call], duration: float, concurrency: int, processes: Processes
) -> Figures:
    """Runs ``call`` from ``concurrency`` workers for ``duration`` seconds (after a short
    warm-up), reading the processes' CPU over the timed part. Given several calls
    (the same call on several connections), worker k makes call k modulo their number.

    Raises BenchFailed if any call failed, warm-up included, or none completed.
    """
    calls = [call] if callable(call) else list(call)
    progress(f"{name} ({duration:g} s, {concurrency} in flight)")
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    made = 0

    async def worker(call: Call, until: float, record: bool) -> None:
        nonlocal made
        while (started := time.perf_counter()) < until:
            made += 1
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                failures[exc.code().name] += 1
            if record:
                latencies.append(time.perf_counter() - started)

    warm_until = time.perf_counter() + min(1.0, duration / 5)
    await asyncio.gather(*(worker(calls[k % len(calls)], warm_until, False) for k in range(concurrency)))
    window = CpuWindow(processes, own_cpu_s)
    began = time.perf_counter()
    await asyncio.gather(*(worker(calls[k % len(calls)], began + duration, True) for k in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu = window.per_call(len(latencies))
    if failures:
        codes = ", ".join(f"{code} {count}" for code, count in failures.most_common())
        raise BenchFailed(f"{name}: {failures.total()} of {made} calls failed ({codes})")
    if not latencies:
        raise BenchFailed(f"{name}: no call completed in {duration:g} s")
    p50, p99 = percentiles(latencies)
    return Figures(name, len(latencies) / elapsed, p50 * 1000, p99 * 1000, cpu, max(latencies) * 1000)


async def run_pgbench(name: str, script: str, url: str, duration: float, clients: int, processes: Processes) -> Figures:
    """pgbench running ``script`` against ``url``: the database's ceiling for the same SQL.

    The client CPU is pgbench's own (read from this process's reaped children).
    Cancelled (Ctrl-C), it kills pgbench rather than wait for it.
    """
    name = f"pgbench {name} (c={clients})"
    progress(f"{name} ({duration:g} s)")
    with tempfile.TemporaryDirectory(prefix="nexus-pgbench-") as work:
        script_file = Path(work) / "script.sql"
        script_file.write_text(script + "\n")
        args = [str(embedded.bin_dir() / "pgbench"), "-n", "-M", "prepared", "-c", str(clients),
                "-j", str(min(clients, 2)), "-T", str(max(round(duration), 1)), "--log", "-f", str(script_file), url]
        window = CpuWindow(dataclasses.replace(processes, server_pid=None), children_cpu_s)  # pgbench skips the server
        pgbench = await asyncio.create_subprocess_exec(
            *args, cwd=work, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            stdout, stderr = await asyncio.wait_for(pgbench.communicate(), duration + 60)
        except TimeoutError:
            raise BenchFailed(f"{name}: pgbench did not finish within {duration + 60:g} s") from None
        finally:
            if pgbench.returncode is None:
                pgbench.kill()
                await pgbench.wait()
        latencies_us = [int(line.split()[2]) for log in Path(work).glob("pgbench_log.*")
                        for line in log.read_text().splitlines()]
    out, err = stdout.decode(), stderr.decode()
    failed = re.search(r"number of failed transactions: (\d+)", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    tps = re.search(r"tps = ([\d.]+)", out)
    if pgbench.returncode or (failed and int(failed.group(1))) or not (done and tps and int(done.group(1))):
        detail = failed.group(0) if failed and int(failed.group(1)) else (err.strip().splitlines() or ["-"])[-1]
        raise BenchFailed(f"{name}: pgbench exit code {pgbench.returncode}: {detail}")
    p50_us, p99_us = percentiles(latencies_us)
    return Figures(name, float(tps.group(1)), p50_us / 1000, p99_us / 1000, window.per_call(int(done.group(1))))
