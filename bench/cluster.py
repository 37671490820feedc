"""Single node against a 3-node Citus cluster, in one run (``--suite cluster``).

Both targets are the bench's own and run side by side: a server on an embedded
PostgreSQL, and a server on a coordinator + 2 workers on 127.0.0.1 (Citus built
by scripts/build_citus.py; the server distributes the schema when it migrates).
Each scenario runs on one, then at once on the other, so both see the same
machine. On one machine the cluster cannot be faster: the figures show what the
hop to a worker costs (throughput, latency, CPU per call of every process).
pgbench then calls the delegated functions (the hot write paths) on the
coordinator next to the same pgbench on the single node.

Then two faults on the cluster, under load, CPU not counted (a node that
comes or goes is not in the processes counted):

- a worker down: Credit of the payers whose balances live on the other worker,
  before, while and after the first worker is stopped as a crash would stop it
  (every call must succeed); Credits of the stopped worker's payers meanwhile
  (their codes and how fast they fail); how long until they succeed again
  once it restarts;
- a worker added and the shards rebalanced (block writes) while uniform
  Credits run: the rps and the slowest call during the move, and its length.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
import uuid
from collections import Counter

import grpc

from bench.core import BenchFailed, Call, Figures, Report, measure, progress, run_pgbench
from bench.interactions import GET_ENTRIES_IN_FLIGHT, check_invariants, in_flight
from bench.targets import Target, citus_cluster, single_node
from bench.workload import Workload
from devtools.citus_cluster import CitusCluster, workers_of
from nexus import database
from nexus.config import Config
from nexus.v1 import token_pb2, token_pb2_grpc

CREATE_MEMORY = "CreateMemory"
RECOVERY_TIMEOUT_S = 120.0  # a restarted worker's keys must take writes again within this
REBALANCE_TIMEOUT_S = 600.0
REBALANCE_WINDOW_S = 2.0
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
        assert cluster.cluster is not None
        await _outage_figures(cluster, cluster.cluster, workload, duration, concurrency, report)
        await _rebalance_figures(cluster, cluster.cluster, workload, concurrency, report)
        report.add()
        for target in targets:
            await check_invariants(target, report)


def _credit(stub: token_pb2_grpc.TokenServiceAsyncStub, metadata: tuple[tuple[str, str], ...], users: list[str]) -> Call:
    return lambda: stub.Credit(
        token_pb2.CreditRequest(user_id=random.choice(users), amount=1, reason="bench", request_id=uuid.uuid4().hex),
        metadata=metadata,
    )


async def _payers_by_worker(target: Target, workload: Workload) -> dict[int, list[str]]:
    """The bench's payers by the port of the worker that holds their balance."""
    conn = await database.connect(target.database_url)
    try:
        ports = await workers_of(conn, [f"bench-payer-{n}" for n in range(1, workload.payers + 1)])
    finally:
        await conn.close()
    by_worker: dict[int, list[str]] = {}
    for payer, port in ports.items():
        by_worker.setdefault(port, []).append(payer)
    return by_worker


async def _outage_figures(
    target: Target, cluster: CitusCluster, workload: Workload, duration: float, concurrency: int, report: Report
) -> None:
    stopped, kept = cluster.workers[0], cluster.workers[1]
    by_worker = await _payers_by_worker(target, workload)
    survivors, stranded = by_worker.get(kept.port, []), by_worker.get(stopped.port, [])
    if not survivors or not stranded:
        raise BenchFailed(f"worker outage: payers on the two workers: {len(survivors)} and {len(stranded)}")
    name = "Credit, payers on the worker that stays up"
    async with grpc.aio.insecure_channel(target.address) as channel:
        stub = token_pb2_grpc.TokenServiceStub(channel)
        survivor_credit = _credit(stub, target.metadata, survivors)
        stranded_credit = _credit(stub, target.metadata, stranded)
        before = await measure(f"{name}, before", survivor_credit, duration, concurrency, target.processes)
        progress("stopping a worker (pg_ctl stop -m immediate)")
        await cluster.crash_node(stopped)
        try:
            during = await measure(f"{name}, other worker down", survivor_credit, duration, concurrency,
                                   target.processes)
            codes: Counter[str] = Counter()
            slowest = 0.0
            for _ in range(20):
                started = time.perf_counter()
                try:
                    await stranded_credit()
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                slowest = max(slowest, time.perf_counter() - started)
        finally:
            await cluster.restart_node(stopped)
        restarted = time.perf_counter()
        while True:
            try:
                await stranded_credit()
                break
            except grpc.aio.AioRpcError:
                if time.perf_counter() - restarted > RECOVERY_TIMEOUT_S:
                    raise BenchFailed(f"worker outage: the restarted worker's payers took no Credit within "
                                      f"{RECOVERY_TIMEOUT_S:.0f} s") from None
                await asyncio.sleep(0.1)
        recovered = time.perf_counter() - restarted
        after = await measure(f"{name}, after", survivor_credit, duration, concurrency, target.processes)
    report.add()
    report.add(f"worker outage on the {target.label} (one of 2 workers stopped with pg_ctl stop -m immediate), "
               f"{concurrency} calls in flight:")
    for phase, figures in (("before", before), ("worker down", during), ("after", after)):
        report.add(f"  Credit, payers on the other worker, {phase:<12} {figures.rps:8.0f} rps   "
                   f"p50 {figures.p50_ms:7.2f} ms   p99 {figures.p99_ms:7.2f} ms   max {figures.max_ms:7.1f} ms")
    report.add(f"  down / before {during.rps / before.rps:.2f}, after / before {after.rps / before.rps:.2f}; "
               f"no call failed")
    report.add(f"  Credit, payers on the stopped worker, 20 one at a time: "
               f"{', '.join(f'{code} {n}' for code, n in codes.most_common())}, slowest {slowest * 1000:.0f} ms; "
               f"first success {recovered:.1f} s after the restart")


async def _rebalance_figures(
    target: Target, cluster: CitusCluster, workload: Workload, concurrency: int, report: Report
) -> None:
    payers = [f"bench-payer-{n}" for n in range(1, workload.payers + 1)]
    progress("adding a worker and rebalancing the shards (block writes) under uniform Credits")
    await cluster.add_worker()
    conn = await database.connect(target.database_url)
    windows: list[Figures] = []
    async with grpc.aio.insecure_channel(target.address) as channel:
        credit = _credit(token_pb2_grpc.TokenServiceStub(channel), target.metadata, payers)
        try:
            await conn.execute("SELECT citus_rebalance_start(shard_transfer_mode => 'block_writes')")
            began = time.perf_counter()
            while True:
                windows.append(await measure("Credit uniform, rebalancing", credit, REBALANCE_WINDOW_S, concurrency,
                                             target.processes))
                state = await conn.fetchval("SELECT state FROM citus_rebalance_status() ORDER BY job_id DESC LIMIT 1")
                if state not in ("scheduled", "running"):
                    break
                if time.perf_counter() - began > REBALANCE_TIMEOUT_S:
                    raise BenchFailed(f"rebalance: still {state} after {REBALANCE_TIMEOUT_S:.0f} s")
            moved_in = time.perf_counter() - began
            moved = await conn.fetchval(
                "SELECT count(*) FROM citus_shards WHERE nodeport = $1", cluster.workers[-1].port)
        finally:
            await conn.close()
    if state != "finished":
        raise BenchFailed(f"rebalance: ended {state}")
    report.add()
    report.add(f"rebalance on the {target.label}: a third worker added, {moved} shard placements moved to it "
               f"(block writes) in {moved_in:.0f} s while uniform Credits ran ({concurrency} in flight): "
               f"{statistics.mean(w.rps for w in windows):.0f} rps, slowest call "
               f"{max(w.max_ms for w in windows):.0f} ms, p99 of the worst {REBALANCE_WINDOW_S:g} s window "
               f"{max(w.p99_ms for w in windows):.0f} ms; no call failed")


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
