"""The ledger suite (``--suite ledger``): batches, two-phase transfers, expiry.

In one run, so the ratios compare like with like: the transport ceiling (the
health Check), a single Transfer, SubmitOperations of 1,000 transfers a call
against pgbench calling ``apply_token_operations`` with the same 1,000
transfers a call (the database's ceiling for that SQL), a reservation and its
post (two round trips), and the expiry lag: with 100k reservations
outstanding, how long after its expire_time each of 1,000 short ones is voided.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.core import BenchFailed, Figures, Report, measure, percentiles, progress, run_pgbench
from bench.interactions import check_invariants
from bench.targets import Target
from bench.workload import USERS, Workload
from nexus import database
from nexus.v1 import token_pb2, token_pb2_grpc

BATCH = 1000  # transfers per SubmitOperations call, and per pgbench call
BATCHES_IN_FLIGHT = 2
OUTSTANDING = 100_000  # reservations that stay pending while the expiry lag is measured
SHORT_LIVED = 1000  # reservations whose expiry is timed
SHORT_TIMEOUT_S = 2
EXPIRY_WAIT_S = 120


async def run_ledger(
    target: Target, workload: Workload, duration: float, concurrency: int, scale: float, report: Report
) -> None:
    await workload.load(target.database_url)
    report.add(f"target {target.label} {target.address}, {duration:g} s per scenario, {concurrency} calls in flight "
               f"({BATCHES_IN_FLIGHT} for SubmitOperations of {BATCH})")
    figures: dict[str, Figures] = {}
    async with grpc.aio.insecure_channel(target.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        tokens = token_pb2_grpc.TokenServiceStub(channel)

        def payer() -> str:
            return f"bench-payer-{random.randint(1, workload.payers)}"

        def transfer(request_id: str = "") -> token_pb2.TransferRequest:
            return token_pb2.TransferRequest(from_user_id=payer(), to_user_id=f"bench-payee-{random.randint(1, USERS)}",
                                             amount=1, reason="bench", request_id=request_id)

        async def submit_batch() -> None:
            operations = [token_pb2.Operation(request_id=uuid.uuid4().hex, transfer=transfer()) for _ in range(BATCH)]
            reply = await tokens.SubmitOperations(token_pb2.SubmitOperationsRequest(operations=operations),
                                                  metadata=target.metadata)
            failed = [r.error.message for r in reply.results if not r.ok]
            if failed:
                raise BenchFailed(f"SubmitOperations: {len(failed)} of {BATCH} operations failed: {failed[:3]}")

        async def reserve_and_post() -> None:
            hold = token_pb2.CreatePendingTransferRequest(
                from_user_id=payer(), to_user_id=f"bench-payee-{random.randint(1, USERS)}", amount=1,
                request_id=uuid.uuid4().hex)
            created = await tokens.CreatePendingTransfer(hold, metadata=target.metadata)
            await tokens.PostPendingTransfer(token_pb2.PostPendingTransferRequest(
                pending_transfer_id=created.pending_transfer.pending_transfer_id, request_id=uuid.uuid4().hex),
                metadata=target.metadata)

        scenarios = {
            "health Check (transport ceiling)": (lambda: health.Check(health_pb2.HealthCheckRequest()), concurrency),
            "Transfer uniform": (lambda: tokens.Transfer(transfer(uuid.uuid4().hex), metadata=target.metadata),
                                 concurrency),
            f"SubmitOperations {BATCH} transfers": (submit_batch, BATCHES_IN_FLIGHT),
            "CreatePendingTransfer + Post": (reserve_and_post, concurrency),
        }
        for name, (call, in_flight) in scenarios.items():
            figures[name] = await measure(name, call, duration, in_flight, target.processes)
            report.add(figures[name].line())
        script = _pgbench_batch(workload)
        figures["pgbench"] = await run_pgbench(f"{BATCH} transfers a call", script, target.database_url, duration,
                                               BATCHES_IN_FLIGHT, target.processes)
        report.add(figures["pgbench"].line())
        lag = await _expiry_lag(target, tokens, workload, scale)

    health_rps = figures["health Check (transport ceiling)"].rps
    batch_rps = figures[f"SubmitOperations {BATCH} transfers"].rps
    report.add()
    report.add(f"{'SubmitOperations transfers/s':<44} {batch_rps * BATCH:7.0f}  (goal >= 10000)")
    report.add(f"{'SubmitOperations / pgbench, same batch':<44} {batch_rps / figures['pgbench'].rps:7.2f}"
               "  (goal >= 0.8)")
    report.add(f"{'pgbench transfers/s, ' + str(BATCH) + ' a call':<44} {figures['pgbench'].rps * BATCH:7.0f}")
    report.add(f"{'Transfer uniform / health Check':<44} {figures['Transfer uniform'].rps / health_rps:7.2f}")
    report.add(f"{'CreatePending + Post pairs / Transfer':<44} "
               f"{figures['CreatePendingTransfer + Post'].rps / figures['Transfer uniform'].rps:7.2f}")
    p50, p99, worst = lag
    report.add(f"{'expiry lag, ' + str(round(OUTSTANDING * scale)) + ' outstanding (ms)':<44} "
               f"p50 {p50:.0f}  p99 {p99:.0f}  max {worst:.0f}  (goal p99 <= 1000)")
    report.add()
    await check_invariants(target, report)


def _pgbench_batch(workload: Workload) -> str:
    """What SubmitOperations sends for BATCH random transfers: one apply_token_operations call."""
    n = BATCH
    return f"""SELECT count(*) FROM apply_token_operations(NULL,
    (SELECT array_agg('bench-payer-' || (1 + floor(random() * {workload.payers}))::int) FROM generate_series(1, {n})),
    array_fill('transfer'::text, ARRAY[{n}]),
    (SELECT array_agg('bench-payee-' || (1 + floor(random() * {USERS}))::int) FROM generate_series(1, {n})),
    array_fill(1::bigint, ARRAY[{n}]), array_fill('bench'::text, ARRAY[{n}]), array_fill(''::text, ARRAY[{n}]),
    (SELECT array_agg(gen_random_uuid()::text) FROM generate_series(1, {n})),
    array_fill(NULL::text, ARRAY[{n}]), array_fill(NULL::integer, ARRAY[{n}]), array_fill(false, ARRAY[{n}]));"""


async def _expiry_lag(
    target: Target, tokens: token_pb2_grpc.TokenServiceAsyncStub, workload: Workload, scale: float
) -> tuple[float, float, float]:
    """p50, p99 and max of resolve_time - expire_time (ms) over SHORT_LIVED reservations expiring
    while OUTSTANDING others stay pending (loaded in batches through the ledger function)."""
    outstanding = round(OUTSTANDING * scale)
    progress(f"expiry lag: {outstanding} reservations outstanding, {SHORT_LIVED} expiring after {SHORT_TIMEOUT_S} s")
    conn = await database.connect(target.database_url)
    try:
        for start in range(0, outstanding, BATCH):
            n = min(BATCH, outstanding - start)
            payers = [f"bench-payer-{random.randint(1, workload.payers)}" for _ in range(n)]
            await conn.fetchval(
                "SELECT count(*) FROM apply_token_operations(($1::text[])[1], $1, array_fill('create_pending'::text, "
                "ARRAY[$3::int]), $2, array_fill(1::bigint, ARRAY[$3::int]), array_fill('bench'::text, ARRAY[$3::int]),"
                " array_fill(''::text, ARRAY[$3::int]), $4, array_fill(NULL::text, ARRAY[$3::int]),"
                " array_fill(86400, ARRAY[$3::int]))",
                payers, [f"bench-payee-{random.randint(1, USERS)}" for _ in range(n)], n,
                [uuid.uuid4().hex for _ in range(n)],
            )
        gate = asyncio.Semaphore(50)

        async def hold() -> str:
            async with gate:
                request = token_pb2.CreatePendingTransferRequest(
                    from_user_id=f"bench-payer-{random.randint(1, workload.payers)}",
                    to_user_id=f"bench-payee-{random.randint(1, USERS)}", amount=1,
                    timeout_seconds=SHORT_TIMEOUT_S, request_id=uuid.uuid4().hex)
                reply = await tokens.CreatePendingTransfer(request, metadata=target.metadata)
                return reply.pending_transfer.pending_transfer_id

        ids = await asyncio.gather(*(hold() for _ in range(SHORT_LIVED)))
        deadline = asyncio.get_running_loop().time() + EXPIRY_WAIT_S
        while await conn.fetchval(
            "SELECT count(*) FROM pending_transfers WHERE pending_transfer_id = ANY ($1) AND status = 'pending'", ids
        ):
            if asyncio.get_running_loop().time() > deadline:
                raise BenchFailed(f"expiry lag: reservations still pending {EXPIRY_WAIT_S} s after their timeout")
            await asyncio.sleep(0.2)
        rows = await conn.fetch(
            "SELECT status, resolve_time - expire_time AS lag FROM pending_transfers WHERE pending_transfer_id = ANY ($1)",
            ids,
        )
    finally:
        await conn.close()
    if any(r["status"] != "expired" for r in rows):
        raise BenchFailed("expiry lag: a short-lived reservation was resolved other than by expiry")
    lags = [r["lag"] / datetime.timedelta(milliseconds=1) for r in rows]
    p50, p99 = percentiles(lags)
    return p50, p99, max(lags)
