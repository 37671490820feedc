"""The interaction, follow and token suite (``--suite interactions``).

Ceilings first, then the service, so the ratios compare like with like on a
noisy shared machine: the transport ceiling (the standard health Check RPC, no
database work) and the database ceiling (pgbench calling the same stored
functions the RPCs call). Then one worker against two (bench/workers.py), and
the invariants: reconcile must find no drift.
"""

from __future__ import annotations

import grpc

from bench.core import BenchFailed, CpuPerCall, Figures, Report, measure, progress, run_pgbench
from bench.targets import Target
from bench.workers import run_workers
from bench.workload import Workload
from nexus import database
from nexus.cli.reconcile import reconcile
from nexus.config import Config

GET_ENTRIES_IN_FLIGHT = 8
# (script, pgbench clients)
PGBENCH_RUNS = (
    ("toggle uniform", 8), ("toggle hot", 8), ("toggle hot, 16 per call", 4), ("toggle uniform, 16 per call", 4),
    ("counts 100", 1),
    ("transfer uniform", 8), ("transfer hot", 8), ("transfer uniform, 16 per call", 4),
)


def in_flight(scenario: str, concurrency: int) -> int:
    return GET_ENTRIES_IN_FLIGHT if scenario.startswith("GetEntries") else concurrency


async def run_interactions(
    target: Target, config: Config, workload: Workload, duration: float, concurrency: int, report: Report
) -> None:
    await workload.load(target.database_url)
    figures: dict[str, Figures] = {}
    report.add(f"target {target.label} {target.address}, {duration:g} s per scenario, {concurrency} calls in flight "
               f"({GET_ENTRIES_IN_FLIGHT} for GetEntries)")
    async with grpc.aio.insecure_channel(target.address) as channel:
        for name, call in workload.rpc_scenarios(channel, target.metadata).items():
            figures[name] = await measure(name, call, duration, in_flight(name, concurrency), target.processes)
            report.add(figures[name].line())
    scripts = workload.pgbench_scripts()
    for script, clients in PGBENCH_RUNS:
        result = await run_pgbench(script, scripts[script], target.database_url, duration, clients, target.processes)
        figures[script] = result
        report.add(result.line())
    _add_ratios(figures, report)
    await run_workers(config, target, workload, duration, concurrency, report)
    report.add()
    await check_invariants(target, report)


def _add_ratios(figures: dict[str, Figures], report: Report) -> None:
    def rps(name: str) -> float:
        return figures[name].rps

    health = rps("health Check (transport ceiling)")
    rows = [
        ("ToggleResonance uniform / health Check", rps("ToggleResonance uniform") / health, ">= 0.7"),
        ("ToggleResonance hot / uniform", rps("ToggleResonance hot entry") / rps("ToggleResonance uniform"), ">= 0.9"),
        ("ToggleResonance uniform / pgbench 1-call", rps("ToggleResonance uniform") / rps("toggle uniform"), ""),
        ("pgbench toggle hot / uniform", rps("toggle hot") / rps("toggle uniform"), ">= 0.8"),
        ("Follow celebrity / uniform", rps("Follow one celebrity") / rps("Follow uniform"), ""),
        ("Transfer uniform / health Check", rps("Transfer uniform") / health, ">= 0.6"),
        ("Transfer hot merchant / uniform", rps("Transfer to one hot merchant") / rps("Transfer uniform"), ">= 0.5"),
        ("Transfer uniform / pgbench", rps("Transfer uniform") / rps("transfer uniform"), ""),
        ("pgbench transfer hot / uniform", rps("transfer hot") / rps("transfer uniform"), ""),
    ]
    report.add()
    for label, ratio, goal in rows:
        report.add(f"{label:<44} {ratio:5.2f}  {'(goal ' + goal + ')' if goal else ''}")
    batch = figures["toggle hot, 16 per call"]
    report.add(f"{'pgbench toggles/s in calls of 16 (hot entry)':<44} {batch.rps * 16:5.0f}")
    report.add(f"{'pgbench counts 100 p50 (ms)':<44} {figures['counts 100'].p50_ms:5.3f}  (goal <= 1)")
    # CPU per call against its floors: the server's against a health Check's, and
    # PostgreSQL's against pgbench's per write when calls carry 16 of them.
    health_cpu = figures["health Check (transport ceiling)"].cpu.server_us
    for name, batched in (("ToggleResonance uniform", "toggle uniform, 16 per call"),
                          ("Transfer uniform", "transfer uniform, 16 per call")):
        cpu, batched_pg = figures[name].cpu, figures[batched].cpu.postgres_us
        rpc = name.split()[0]
        if health_cpu and cpu.server_us is not None:
            report.add(f"{rpc + ' / health Check, server CPU':<44} {cpu.server_us / health_cpu:5.2f}  (goal <= 1.3)")
        if batched_pg and cpu.postgres_us is not None:
            report.add(f"{rpc + ' / pgbench 16-call, PG CPU':<44} {cpu.postgres_us / (batched_pg / 16):5.2f}"
                       "  (goal <= 1.5)")
    # With every core busy, throughput goes as 1 / CPU per call: the CPU a health
    # Check costs against the CPU a call costs bounds the "/ health Check" ratios.
    for name in ("ToggleResonance uniform", "Transfer uniform"):
        bound = _cpu_ratio(figures["health Check (transport ceiling)"].cpu, figures[name].cpu)
        if bound is not None:
            report.add(f"{name.split()[0] + ' / health Check, CPU bound':<44} {bound:5.2f}  (health CPU/call ÷ its CPU/call)")


def _cpu_ratio(ceiling: CpuPerCall, call: CpuPerCall) -> float | None:
    if ceiling.total_us is None or not call.total_us:
        return None
    return ceiling.total_us / call.total_us


async def check_invariants(target: Target, report: Report) -> None:
    progress(f"reconcile on the {target.label} (counters and balances against their rows)")
    conn = await database.connect(target.database_url)
    try:
        drift = await reconcile(conn, fix=False)
    finally:
        await conn.close()
    if drift:
        raise BenchFailed(f"reconcile on the {target.label} found {len(drift)} counter(s) that differ from their rows: "
                          f"{drift[:3]}")
    report.add(f"invariants, {target.label}: reconcile drift 0")
