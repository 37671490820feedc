"""Single node against a 3-node Citus cluster, in one run (``--suite cluster``).

Both targets are the bench's own and run side by side: a server on an embedded
PostgreSQL, and a server on a coordinator + 2 workers on 127.0.0.1 (Citus built
by scripts/build_citus.py; the server distributes the schema when it migrates).
Each scenario runs on one, then at once on the other, so both see the same
machine. On one machine the cluster cannot be faster: the figures show what the
hop to a worker costs (throughput, latency, CPU per call of every process).
pgbench then calls the delegated functions (the hot write paths) on the
coordinator next to the same pgbench on the single node.
"""

from __future__ import annotations

import contextlib

import grpc

from bench.core import BenchFailed, Figures, Report, measure, run_pgbench
from bench.interactions import GET_ENTRIES_IN_FLIGHT, check_invariants, in_flight
from bench.targets import Target, citus_cluster, single_node
from bench.workload import Workload
from nexus import database
from nexus.config import Config

CREATE_MEMORY = "CreateMemory"
# (script, pgbench clients): one call of a function the cluster delegates to the key's worker.
PGBENCH_DELEGATED = (
    ("toggle uniform", 8), ("toggle hot", 8), ("transfer uniform", 8), ("follow uniform", 8),
    ("create_memories 1", 8),
)


async def run_cluster(config: Config, workload: Workload, duration: float, concurrency: int, report: Report) -> None:
    async with contextlib.AsyncExitStack() as stack:
        single = await stack.enter_async_context(single_node(config))
        cluster = await stack.enter_async_context(citus_cluster(config))
        targets = (single, cluster)
        await _check_distributed(cluster)
        for target in targets:
            await workload.load(target.database_url)
        figures: dict[str, list[Figures]] = {}
        channels = [await stack.enter_async_context(grpc.aio.insecure_channel(t.address)) for t in targets]
        scenarios = [
            {**workload.rpc_scenarios(channel, t.metadata), CREATE_MEMORY: workload.create_memory(channel, t.metadata)}
            for t, channel in zip(targets, channels, strict=True)
        ]
        for name in scenarios[0]:
            figures[name] = [
                await measure(f"{name} [{t.label}]", calls[name], duration, in_flight(name, concurrency), t.processes)
                for t, calls in zip(targets, scenarios, strict=True)
            ]
        scripts = workload.pgbench_scripts()
        for script, clients in PGBENCH_DELEGATED:
            figures[f"pgbench {script} (c={clients})"] = [
                await run_pgbench(f"{script} [{t.label}]", scripts[script], t.database_url, duration, clients,
                                  t.processes)
                for t in targets
            ]
        report.add(f"single node vs {cluster.label}, same run, {duration:g} s per scenario, {concurrency} calls in "
                   f"flight ({GET_ENTRIES_IN_FLIGHT} for GetEntries). CPU per call from the processes' counters: the "
                   "server, every PostgreSQL process of the target (all nodes), the client (the bench, or pgbench)")
        for name, (one, many) in figures.items():
            report.add()
            report.add(name)
            for target, result in zip(targets, (one, many), strict=True):
                report.add(f"  {target.label:<16} {result.values()}")
            report.add(f"  {'cluster / single':<16} {_ratios(one, many)}")
        report.add()
        for target in targets:
            await check_invariants(target, report)


def _ratios(one: Figures, many: Figures) -> str:
    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or not b else f"{a / b:.2f}"

    return (f"rps {ratio(many.rps, one.rps)}   p50 {ratio(many.p50_ms, one.p50_ms)}   "
            f"p99 {ratio(many.p99_ms, one.p99_ms)}   CPU/call {ratio(many.cpu.total_us, one.cpu.total_us)} "
            f"(postgres {ratio(many.cpu.postgres_us, one.cpu.postgres_us)})")


async def _check_distributed(cluster: Target) -> None:
    """The cluster figures mean something only if the server did distribute the schema."""
    conn = await database.connect(cluster.database_url)
    try:
        tables, workers = await conn.fetchrow(
            "SELECT count(DISTINCT table_name), count(DISTINCT (nodename, nodeport)) FROM citus_shards")
    finally:
        await conn.close()
    if tables == 0 or workers < 2:
        raise BenchFailed(f"the cluster is not distributed: {tables} distributed tables with shards on {workers} nodes")
