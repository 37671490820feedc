"""One worker against two (part of ``--suite interactions``): what a second
server process (``nexus serve --workers 2``) adds on this machine.

Two servers of the bench's own on the target's database, one with one worker
and one with two, run side by side; each scenario runs on one, then on the
other, so both see the same machine. The load goes over CONNECTIONS
connections to each, since the kernel splits connections between the workers,
not calls. A server's CPU per call is that of its parent and all its workers.
"""

from __future__ import annotations

import contextlib

import grpc

from bench.core import Figures, Report, measure
from bench.targets import Target, own_server
from bench.workload import Workload
from nexus.config import Config

WORKER_COUNTS = (1, 2)
CONNECTIONS = 16
SCENARIOS = ("health Check (transport ceiling)", "ToggleResonance uniform")


async def run_workers(
    config: Config, target: Target, workload: Workload, duration: float, concurrency: int, report: Report
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(own_server(config, f"{n} worker{'s' if n > 1 else ''}", target.database_url,
                                                       target.processes.pgdata_dirs, workers=n))
            for n in WORKER_COUNTS
        ]
        scenarios = []
        for server in servers:
            channels = [
                await stack.enter_async_context(
                    grpc.aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
                )
                for _ in range(CONNECTIONS)
            ]
            scenarios.append([workload.rpc_scenarios(channel, server.metadata) for channel in channels])
        figures: dict[str, list[Figures]] = {}
        for name in SCENARIOS:
            figures[name] = [
                await measure(f"{name} [{server.label}]", [calls[name] for calls in per_connection], duration,
                              concurrency, server.processes)
                for server, per_connection in zip(servers, scenarios, strict=True)
            ]
    report.add()
    report.add(f"workers: {' and '.join(s.label for s in servers)} side by side on the same database, {CONNECTIONS} "
               f"connections each; CPU per call of the server is its parent's and its workers'")
    for name, (one, two) in figures.items():
        report.add(name)
        for server, result in zip(servers, (one, two), strict=True):
            report.add(f"  {server.label:<10} {result.values()}")
        report.add(f"  {'2 / 1':<10} {_ratios(one, two)}")


def _ratios(one: Figures, two: Figures) -> str:
    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or not b else f"{a / b:.2f}"

    return (f"rps {ratio(two.rps, one.rps)}   CPU/call {ratio(two.cpu.total_us, one.cpu.total_us)} "
            f"(server {ratio(two.cpu.server_us, one.cpu.server_us)})")
