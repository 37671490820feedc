"""Pending (two-phase) transfers, account policy and balances at an instant.

A reservation leaves the payer's available balance at once and moves nothing
until it is posted (in full or in part, the rest returning to the payer),
voided or expired; it resolves exactly once, also when post, void and expiry
race and when several replicas sweep expiries. An overdraft limit lets a
balance go below zero that far; a closed account takes no new movement but
its reservations still resolve. Every balance equals its ledger and every
reservation counter the reservations outstanding (reconcile_balances).
"""

from __future__ import annotations

import asyncio
import datetime
import random
from collections import Counter
from typing import Any

import asyncpg
import grpc
import pytest

from nexus import database
from nexus.v1 import token_pb2 as pb

from support.rpc import SERVICE, Clients, auth, bad_request_fields, precondition_types, rpc_error
from support.waiting import eventually

INT64_MAX = 2**63 - 1

# The cluster pass of CI keeps the tests whose work spreads over workers or
# races (marked cluster): posts and voids across workers, expiry sweeps, the
# storm, balances as of an instant (read per user); the release check runs all.


# ---------------------------------------------------------------- helpers


async def credit(clients: Clients, user: str, amount: int, request_id: str = "") -> pb.CreditResponse:
    request = pb.CreditRequest(user_id=user, amount=amount, request_id=request_id or f"fund-{user}-{amount}")
    return await clients.tokens.Credit(request, metadata=SERVICE)


async def reserve(
    clients: Clients, payer: str, payee: str, amount: int, request_id: str, *, timeout_seconds: int = 0,
    metadata: Any = None,
) -> pb.CreatePendingTransferResponse:
    request = pb.CreatePendingTransferRequest(
        from_user_id=payer, to_user_id=payee, amount=amount, timeout_seconds=timeout_seconds,
        reason="order", reference_id="order-1", request_id=request_id,
    )
    return await clients.tokens.CreatePendingTransfer(request, metadata=metadata or auth(payer))


async def post(
    clients: Clients, pending_id: str, request_id: str, amount: int = 0, metadata: Any = SERVICE
) -> pb.PostPendingTransferResponse:
    request = pb.PostPendingTransferRequest(pending_transfer_id=pending_id, amount=amount, request_id=request_id)
    return await clients.tokens.PostPendingTransfer(request, metadata=metadata)


async def void(clients: Clients, pending_id: str, request_id: str, metadata: Any = SERVICE) -> pb.VoidPendingTransferResponse:
    request = pb.VoidPendingTransferRequest(pending_transfer_id=pending_id, request_id=request_id)
    return await clients.tokens.VoidPendingTransfer(request, metadata=metadata)


async def balances(clients: Clients, *users: str, as_of: datetime.datetime | None = None) -> dict[str, tuple[int, ...]]:
    """(balance, pending_in, pending_out, available) per user."""
    request = pb.GetBalancesRequest(user_ids=list(users))
    if as_of is not None:
        request.as_of.FromDatetime(as_of)
    response = await clients.tokens.GetBalances(request, metadata=SERVICE)
    return {b.user_id: (b.balance, b.pending_in, b.pending_out, b.available) for b in response.balances}


async def set_policy(clients: Clients, user: str, overdraft_limit: int = 0, closed: bool = False) -> pb.Balance:
    request = pb.SetAccountPolicyRequest(user_id=user, overdraft_limit=overdraft_limit, closed=closed)
    return (await clients.tokens.SetAccountPolicy(request, metadata=SERVICE)).balance


async def ledger_kinds(clients: Clients, user: str) -> list[tuple[str, int, int, int, int]]:
    """The user's ledger, oldest first: (kind, amount, balance_after, pending_in_after, pending_out_after)."""
    response = await clients.tokens.ListTransactions(pb.ListTransactionsRequest(user_id=user), metadata=SERVICE)
    return [
        (pb.TransactionKind.Name(t.kind).removeprefix("TRANSACTION_KIND_"), t.amount, t.balance_after,
         t.pending_in_after, t.pending_out_after)
        for t in reversed(response.transactions)
    ]


def assert_refused(error: grpc.aio.AioRpcError, violation: str) -> None:
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    assert precondition_types(error) == [violation]


async def assert_reconciled(db: asyncpg.Connection) -> None:
    assert await db.fetch("SELECT * FROM reconcile_balances(false)") == []


async def snapshot(db: asyncpg.Connection) -> list[str]:
    """Every balance, ledger row and reservation, as text: equal snapshots mean nothing moved."""
    return [
        r[0]
        for table in ("balances", "token_transactions", "pending_transfers")
        for r in await db.fetch(f"SELECT t::text FROM {table} t ORDER BY 1")
    ]


# ---------------------------------------------------------------- reserve, post, void


@pytest.mark.cluster
async def test_a_reservation_holds_funds_until_posted_in_part(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100)
    created = await reserve(clients, "alice", "bob", 60, "hold")

    pending = created.pending_transfer
    assert (pending.from_user_id, pending.to_user_id, pending.amount, pending.posted_amount) == ("alice", "bob", 60, 0)
    assert pending.status == pb.PENDING_TRANSFER_STATUS_PENDING
    assert (pending.reason, pending.reference_id, pending.request_id) == ("order", "order-1", "hold")
    assert not pending.HasField("expire_time") and not pending.HasField("resolve_time")
    assert (created.from_balance.balance, created.from_balance.pending_out, created.from_balance.available) == (100, 60, 40)
    assert (created.to_balance.balance, created.to_balance.pending_in, created.to_balance.available) == (0, 60, 0)
    assert await balances(clients, "alice", "bob") == {"alice": (100, 0, 60, 40), "bob": (0, 60, 0, 0)}

    # Reserved funds are not spendable.
    assert_refused(await rpc_error(clients.tokens.Deduct(
        pb.DeductRequest(user_id="alice", amount=41, request_id="spend"), metadata=auth("alice"))), "INSUFFICIENT_FUNDS")

    posted = await post(clients, pending.pending_transfer_id, "ship", amount=25, metadata=auth("alice"))
    assert posted.pending_transfer.status == pb.PENDING_TRANSFER_STATUS_POSTED
    assert posted.pending_transfer.posted_amount == 25 and posted.pending_transfer.HasField("resolve_time")
    out_leg, in_leg = posted.transactions
    assert (out_leg.kind, out_leg.amount, out_leg.user_id) == (pb.TRANSACTION_KIND_TRANSFER_OUT, 25, "alice")
    assert (in_leg.kind, in_leg.amount, in_leg.user_id) == (pb.TRANSACTION_KIND_TRANSFER_IN, 25, "bob")
    assert {t.pending_transfer_id for t in posted.transactions} == {pending.pending_transfer_id}
    # The 35 not posted return to alice.
    assert (posted.from_balance.balance, posted.from_balance.pending_out, posted.from_balance.available) == (75, 0, 75)
    assert (posted.to_balance.balance, posted.to_balance.pending_in) == (25, 0)
    assert await ledger_kinds(clients, "alice") == [
        ("CREDIT", 100, 100, 0, 0), ("PENDING_OUT", 60, 100, 0, 60), ("TRANSFER_OUT", 25, 75, 0, 0),
    ]
    assert await ledger_kinds(clients, "bob") == [("PENDING_IN", 60, 0, 60, 0), ("TRANSFER_IN", 25, 25, 0, 0)]
    await assert_reconciled(db)


async def test_post_of_zero_moves_all_and_a_resolved_transfer_stays_resolved(
    clients: Clients, db: asyncpg.Connection
) -> None:
    await credit(clients, "alice", 100)
    pending_id = (await reserve(clients, "alice", "bob", 60, "hold")).pending_transfer.pending_transfer_id

    posted = await post(clients, pending_id, "ship")
    assert posted.pending_transfer.posted_amount == 60
    assert await balances(clients, "alice", "bob") == {"alice": (40, 0, 0, 40), "bob": (60, 0, 0, 60)}

    # A retry is the first result; another request is refused, whatever it asks.
    assert await post(clients, pending_id, "ship") == posted
    before = await snapshot(db)
    assert_refused(await rpc_error(post(clients, pending_id, "ship-again")), "PENDING_TRANSFER_RESOLVED")
    assert_refused(await rpc_error(void(clients, pending_id, "cancel")), "PENDING_TRANSFER_RESOLVED")
    assert await snapshot(db) == before
    await assert_reconciled(db)


async def test_a_void_returns_the_whole_reservation(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100)
    pending_id = (await reserve(clients, "alice", "bob", 60, "hold")).pending_transfer.pending_transfer_id

    voided = await void(clients, pending_id, "cancel", metadata=auth("alice"))
    assert voided.pending_transfer.status == pb.PENDING_TRANSFER_STATUS_VOIDED
    assert voided.pending_transfer.posted_amount == 0
    assert (voided.from_balance.balance, voided.from_balance.pending_out, voided.from_balance.available) == (100, 0, 100)
    assert await balances(clients, "alice", "bob") == {"alice": (100, 0, 0, 100), "bob": (0, 0, 0, 0)}
    assert [k[0] for k in await ledger_kinds(clients, "alice")] == ["CREDIT", "PENDING_OUT", "PENDING_VOIDED"]
    assert [k[0] for k in await ledger_kinds(clients, "bob")] == ["PENDING_IN", "PENDING_VOIDED"]
    assert_refused(await rpc_error(post(clients, pending_id, "ship")), "PENDING_TRANSFER_RESOLVED")
    await assert_reconciled(db)


async def test_posting_more_than_reserved_is_invalid_and_moves_nothing(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100)
    pending_id = (await reserve(clients, "alice", "bob", 60, "hold")).pending_transfer.pending_transfer_id
    before = await snapshot(db)

    error = await rpc_error(post(clients, pending_id, "ship", amount=61))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(error) == ["amount"]
    assert await snapshot(db) == before
    # The refusal is that request's result; another request posts.
    again = await rpc_error(post(clients, pending_id, "ship", amount=61))
    assert again.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await post(clients, pending_id, "ship-60", amount=60)).pending_transfer.posted_amount == 60


async def test_a_reservation_is_refused_beyond_the_available_balance(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100)
    await reserve(clients, "alice", "bob", 70, "first")
    before = await snapshot(db)

    assert_refused(await rpc_error(reserve(clients, "alice", "carol", 31, "second")), "INSUFFICIENT_FUNDS")
    assert_refused(await rpc_error(reserve(clients, "nobody", "bob", 1, "none", metadata=SERVICE)), "INSUFFICIENT_FUNDS")
    await credit(clients, "bob", INT64_MAX - 70, "full")  # bob's balance + pending_in is now int64's max
    assert_refused(await rpc_error(credit(clients, "bob", 1, "more")), "BALANCE_OVERFLOW")
    assert_refused(await rpc_error(reserve(clients, "alice", "bob", 1, "third")), "BALANCE_OVERFLOW")
    assert (await balances(clients, "alice"))["alice"] == (100, 0, 70, 30)
    assert [r for r in await snapshot(db) if "bob" not in r] == [r for r in before if "bob" not in r]
    await assert_reconciled(db)


async def test_only_the_payer_or_a_service_resolves(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100)
    pending_id = (await reserve(clients, "alice", "bob", 60, "hold")).pending_transfer.pending_transfer_id
    before = await snapshot(db)

    for call in (post(clients, pending_id, "p", metadata=auth("bob")), void(clients, pending_id, "v", metadata=auth("bob"))):
        assert (await rpc_error(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    for call in (reserve(clients, "alice", "bob", 1, "r", metadata=auth("bob")),
                 clients.tokens.SetAccountPolicy(pb.SetAccountPolicyRequest(user_id="alice", overdraft_limit=5),
                                                 metadata=auth("alice"))):
        assert (await rpc_error(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert await snapshot(db) == before
    # The payee's refused attempt did not take the request_id: the payer's own call applies.
    assert (await void(clients, pending_id, "v", metadata=auth("alice"))).pending_transfer.status == (
        pb.PENDING_TRANSFER_STATUS_VOIDED
    )


async def test_unknown_and_malformed_pending_transfers(clients: Clients, db: asyncpg.Connection) -> None:
    unknown = await rpc_error(post(clients, "00000000-0000-4000-8000-000000000000", "p"))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    for request, field in [
        (pb.PostPendingTransferRequest(pending_transfer_id="nope", request_id="p"), "pending_transfer_id"),
        (pb.PostPendingTransferRequest(pending_transfer_id="00000000-0000-4000-8000-000000000000", amount=-1,
                                       request_id="p"), "amount"),
        (pb.PostPendingTransferRequest(pending_transfer_id="00000000-0000-4000-8000-000000000000"), "request_id"),
    ]:
        error = await rpc_error(clients.tokens.PostPendingTransfer(request, metadata=SERVICE))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(error) == [field]
    for timeout_seconds, amount, to_user, field in [
        (-1, 5, "bob", "timeout_seconds"), (366 * 24 * 3600, 5, "bob", "timeout_seconds"),
        (0, 0, "bob", "amount"), (0, 5, "alice", "to_user_id"), (0, 5, "", "to_user_id"),
    ]:
        request = pb.CreatePendingTransferRequest(
            from_user_id="alice", to_user_id=to_user, amount=amount, timeout_seconds=timeout_seconds, request_id="r"
        )
        error = await rpc_error(clients.tokens.CreatePendingTransfer(request, metadata=SERVICE))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(error) == [field]
    error = await rpc_error(clients.tokens.SetAccountPolicy(
        pb.SetAccountPolicyRequest(user_id="alice", overdraft_limit=-1), metadata=SERVICE))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(error) == ["overdraft_limit"]
    assert await snapshot(db) == []


@pytest.mark.cluster
async def test_reconcile_finds_and_repairs_reservation_drift(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100)
    await reserve(clients, "alice", "bob", 60, "hold")
    await reserve(clients, "alice", "bob", 15, "hold-2")
    await db.execute("UPDATE balances SET pending_out = 10 WHERE user_id = 'alice'")
    await db.execute("UPDATE balances SET pending_in = 0 WHERE user_id = 'bob'")

    found = {tuple(r) for r in await db.fetch("SELECT * FROM reconcile_balances(true)")}
    assert found == {("alice", None, "pending_out", 10, 75), ("bob", None, "pending_in", 0, 75)}
    await assert_reconciled(db)
    assert await balances(clients, "alice", "bob") == {"alice": (100, 0, 75, 25), "bob": (0, 75, 0, 0)}


# ---------------------------------------------------------------- expiry


@pytest.mark.cluster
async def test_an_expired_reservation_is_voided_by_maintenance_and_shows_in_the_ledger(
    clients: Clients, db: asyncpg.Connection
) -> None:
    await credit(clients, "alice", 100)
    created = await reserve(clients, "alice", "bob", 60, "hold", timeout_seconds=1)
    pending = created.pending_transfer
    assert pending.expire_time.ToDatetime() - pending.create_time.ToDatetime() == datetime.timedelta(seconds=1)

    async def expired() -> asyncpg.Record | None:
        row = await db.fetchrow(
            "SELECT * FROM pending_transfers WHERE pending_transfer_id = $1 AND status = 'expired'",
            pending.pending_transfer_id,
        )
        return row

    # The service sweeps every quarter second; a generous bound keeps a busy machine from failing it.
    row = await eventually(expired, "the reservation to expire", timeout=10)
    assert row["resolve_time"] >= row["expire_time"]
    assert await balances(clients, "alice", "bob") == {"alice": (100, 0, 0, 100), "bob": (0, 0, 0, 0)}
    assert [k[0] for k in await ledger_kinds(clients, "alice")] == ["CREDIT", "PENDING_OUT", "PENDING_EXPIRED"]
    assert_refused(await rpc_error(post(clients, pending.pending_transfer_id, "late")), "PENDING_TRANSFER_EXPIRED")
    await assert_reconciled(db)


async def test_a_due_reservation_cannot_be_posted_before_the_sweep(clients: Clients, db: asyncpg.Connection) -> None:
    """Expiry is exact to the second: past its expire_time a post is refused even if no sweep ran yet."""
    await credit(clients, "alice", 100)
    pending_id = (await reserve(clients, "alice", "bob", 60, "hold", timeout_seconds=3600)).pending_transfer.pending_transfer_id
    # Moved into the past directly (the sweep would expire it at once; this one is not swept yet, the
    # server's next sweep will find it, which is what the assertion races against: either way, no post).
    await db.execute("UPDATE pending_transfers SET expire_time = now() - interval '1 second'")
    assert_refused(await rpc_error(post(clients, pending_id, "late")), "PENDING_TRANSFER_EXPIRED")
    assert (await balances(clients, "alice"))["alice"][0] == 100


@pytest.mark.cluster
async def test_replicas_sweeping_at_once_expire_each_reservation_once(db_url: str, db: asyncpg.Connection) -> None:
    """Four sweeps race over 300 due reservations (in batches of 50): each is expired exactly once."""
    users = [f"u{i}" for i in range(10)]
    await db.execute(
        "SELECT count(*) FROM apply_token_operations(($1::text[])[1], $1, array_fill('credit'::text, ARRAY[10]),"
        " array_fill(NULL::text, ARRAY[10]), array_fill(1000::bigint, ARRAY[10]), array_fill(''::text, ARRAY[10]),"
        " array_fill(''::text, ARRAY[10]), $1)",
        users,
    )
    rng = random.Random(7)
    payers = [rng.choice(users) for _ in range(300)]
    payees = [rng.choice([u for u in users if u != p]) for p in payers]
    await db.execute(
        "SELECT count(*) FROM apply_token_operations(($1::text[])[1], $1,"
        " array_fill('create_pending'::text, ARRAY[300]), $2, array_fill(1::bigint, ARRAY[300]),"
        " array_fill(''::text, ARRAY[300]), array_fill(''::text, ARRAY[300]), $3, array_fill(NULL::text, ARRAY[300]),"
        " array_fill(3600, ARRAY[300]))",
        payers, payees, [f"r{i}" for i in range(300)],
    )
    await db.execute("UPDATE pending_transfers SET expire_time = now() - interval '1 second'")

    async def sweep() -> int:
        conn = await database.connect(db_url)
        try:
            total = 0
            while swept := await conn.fetchval("SELECT expire_pending_transfers(50)"):
                total += swept
            return total
        finally:
            await conn.close()

    counts = await asyncio.gather(*(sweep() for _ in range(4)))
    assert sum(counts) == 300
    assert await db.fetchval("SELECT count(*) FROM pending_transfers WHERE status = 'expired'") == 300
    released = Counter(r[0] for r in await db.fetch(
        "SELECT pending_transfer_id FROM token_transactions WHERE kind = 'pending_expired'"))
    assert len(released) == 300 and set(released.values()) == {2}  # one row each for payer and payee
    await assert_reconciled(db)


# ---------------------------------------------------------------- account policy


async def test_an_overdraft_limit_lets_the_balance_go_below_zero_that_far(clients: Clients, db: asyncpg.Connection) -> None:
    policy = await set_policy(clients, "carol", overdraft_limit=50)
    assert (policy.balance, policy.available, policy.overdraft_limit, policy.closed) == (0, 50, 50, False)
    assert not policy.HasField("update_time")

    spent = await clients.tokens.Deduct(pb.DeductRequest(user_id="carol", amount=40, request_id="d1"), metadata=auth("carol"))
    assert spent.balance == -40
    await reserve(clients, "carol", "bob", 10, "hold")
    assert (await balances(clients, "carol"))["carol"] == (-40, 0, 10, 0)
    assert_refused(await rpc_error(clients.tokens.Deduct(
        pb.DeductRequest(user_id="carol", amount=1, request_id="d2"), metadata=auth("carol"))), "INSUFFICIENT_FUNDS")

    # Lowering the limit below the debt is allowed: it only stops further spending.
    lowered = await set_policy(clients, "carol", overdraft_limit=0)
    assert (lowered.balance, lowered.pending_out, lowered.available) == (-40, 10, -50)
    await credit(clients, "carol", 100, "repay")
    assert (await balances(clients, "carol"))["carol"] == (60, 0, 10, 50)
    await assert_reconciled(db)


@pytest.mark.cluster
async def test_a_closed_account_takes_no_new_movement_but_its_reservations_resolve(
    clients: Clients, db: asyncpg.Connection
) -> None:
    await credit(clients, "alice", 100)
    await credit(clients, "bob", 100)
    pending_id = (await reserve(clients, "alice", "bob", 60, "hold")).pending_transfer.pending_transfer_id
    closed = await set_policy(clients, "bob", closed=True)
    assert closed.closed and closed.balance == 100
    before = await snapshot(db)

    refusals = [
        credit(clients, "bob", 1, "c"),
        clients.tokens.Deduct(pb.DeductRequest(user_id="bob", amount=1, request_id="d"), metadata=auth("bob")),
        clients.tokens.Transfer(pb.TransferRequest(from_user_id="alice", to_user_id="bob", amount=1, request_id="t"),
                                metadata=auth("alice")),
        clients.tokens.Transfer(pb.TransferRequest(from_user_id="bob", to_user_id="alice", amount=1, request_id="t"),
                                metadata=auth("bob")),
        reserve(clients, "alice", "bob", 1, "r"),
        reserve(clients, "bob", "alice", 1, "r"),
    ]
    for call in refusals:
        assert_refused(await rpc_error(call), "ACCOUNT_CLOSED")
    assert await snapshot(db) == before

    assert (await post(clients, pending_id, "ship")).to_balance.balance == 160
    assert (await balances(clients, "bob"))["bob"] == (160, 0, 0, 160)
    await assert_reconciled(db)


# ---------------------------------------------------------------- history


@pytest.mark.cluster
async def test_balances_as_of_any_instant(clients: Clients, db: asyncpg.Connection) -> None:
    instants = []

    async def now() -> datetime.datetime:
        instant = await db.fetchval("SELECT clock_timestamp()")
        instants.append(instant)
        return instant

    await now()
    await credit(clients, "alice", 100)
    await now()
    pending_id = (await reserve(clients, "alice", "bob", 60, "hold")).pending_transfer.pending_transfer_id
    await now()
    await post(clients, pending_id, "ship", amount=20)
    await now()

    expected = [
        {"alice": (0, 0, 0, 0), "bob": (0, 0, 0, 0)},
        {"alice": (100, 0, 0, 100), "bob": (0, 0, 0, 0)},
        {"alice": (100, 0, 60, 40), "bob": (0, 60, 0, 0)},
        {"alice": (80, 0, 0, 80), "bob": (20, 0, 0, 20)},
    ]
    for instant, then in zip(instants, expected, strict=True):
        assert await balances(clients, "alice", "bob", as_of=instant) == then, instant
    assert await balances(clients, "alice", "bob") == expected[-1]


# ---------------------------------------------------------------- under concurrency


@pytest.mark.cluster
async def test_reservations_storm_on_a_hot_payer_and_a_hot_payee(clients: Clients, db: asyncpg.Connection) -> None:
    """Many payers reserve towards one hot payee and one hot payer reserves towards many, while
    posts, voids and retries race and reservations expire mid-storm: each reservation resolves at
    most once, every reply agrees with the database, and every balance with its ledger."""
    rng = random.Random(20261207)
    payers = [f"payer{i}" for i in range(12)]
    payees = [f"shop{i}" for i in range(6)]
    await asyncio.gather(*(credit(clients, u, 1000) for u in [*payers, "hot"]))
    gate = asyncio.Semaphore(64)

    async def create(i: int) -> pb.CreatePendingTransferResponse | grpc.aio.AioRpcError:
        payer, payee = ("hot", rng.choice(payees)) if i % 3 == 0 else (rng.choice(payers), "shop0")
        async with gate:
            try:
                return await reserve(clients, payer, payee, rng.randint(1, 120), f"hold{i}",
                                     timeout_seconds=1 if i % 5 == 0 else 0, metadata=SERVICE)
            except grpc.aio.AioRpcError as error:
                return error

    created = await asyncio.gather(*(create(i) for i in range(200)))
    held = [c.pending_transfer for c in created if isinstance(c, pb.CreatePendingTransferResponse)]
    refused = [c for c in created if not isinstance(c, pb.CreatePendingTransferResponse)]
    assert all(precondition_types(e) == ["INSUFFICIENT_FUNDS"] for e in refused), refused[:3]
    assert len(held) >= 80

    async def resolve(pending: pb.PendingTransfer, attempt: int) -> tuple[str, Any]:
        choice = rng.choice(["post", "post-part", "void"])
        request_id = f"{choice}-{pending.pending_transfer_id}-{attempt % 2}"  # two attempts share one request_id
        async with gate:
            try:
                if choice == "void":
                    return choice, await void(clients, pending.pending_transfer_id, request_id)
                amount = 0 if choice == "post" else (pending.amount + 1) // 2
                return choice, await post(clients, pending.pending_transfer_id, request_id, amount=amount)
            except grpc.aio.AioRpcError as error:
                return choice, error

    outcomes = await asyncio.gather(*(resolve(p, attempt) for p in held for attempt in range(3)))
    for _, outcome in outcomes:
        if isinstance(outcome, grpc.aio.AioRpcError):
            assert precondition_types(outcome) in (["PENDING_TRANSFER_RESOLVED"], ["PENDING_TRANSFER_EXPIRED"]), outcome
    # Each resolution the replies report is the one the database holds.
    final = {str(r["pending_transfer_id"]): r for r in await db.fetch("SELECT * FROM pending_transfers")}
    for _, outcome in outcomes:
        if not isinstance(outcome, grpc.aio.AioRpcError):
            row = final[outcome.pending_transfer.pending_transfer_id]
            assert (row["status"], row["posted_amount"]) == (
                pb.PendingTransferStatus.Name(outcome.pending_transfer.status).rsplit("_", 1)[1].lower(),
                outcome.pending_transfer.posted_amount,
            )

    # The ones left pending with a timeout expire; each reservation has exactly one resolution.
    async def all_resolved() -> bool:
        return not await db.fetchval(
            "SELECT count(*) FROM pending_transfers WHERE status = 'pending' AND expire_time IS NOT NULL")

    await eventually(all_resolved, "the timed-out reservations to expire", timeout=15)
    resolutions = Counter(r[0] for r in await db.fetch(
        "SELECT pending_transfer_id FROM token_transactions WHERE kind NOT IN ('pending_out', 'pending_in')"
        " AND pending_transfer_id IS NOT NULL"))
    resolved = await db.fetch("SELECT pending_transfer_id FROM pending_transfers WHERE status <> 'pending'")
    assert {r[0]: 2 for r in resolved} == dict(resolutions)  # one row for the payer, one for the payee
    total = await db.fetchval("SELECT sum(balance) FROM balances")
    assert total == 1000 * (len(payers) + 1)
    await assert_reconciled(db)
