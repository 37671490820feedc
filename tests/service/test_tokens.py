"""TokenService: the ledger's promises against a real server and database.

Balances never go below zero and always equal the sum of the user's ledger;
each user's ledger is a gap-free sequence 1, 2, 3 ... whose balance_after
chain adds up; transfers are atomic; a request_id applies once (also when
sent many times at once); a refused request writes nothing; only services
mint tokens; the ledger is append-only.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest

from nexus.v1 import token_pb2 as pb

from support.rpc import SERVICE, Clients, all_pages, auth, bad_request_fields, precondition_types, rpc_error, token

# The cluster pass of CI keeps the tests whose work the cluster spreads over
# workers or races (marked cluster): transfers in two-phase commits, retries,
# storms, reconcile. The release check runs them all.

# What a movement changes; a refused request records only its failure (token_requests).
TABLES = ("balances", "token_transactions", "pending_transfers")
INT64_MAX = 2**63 - 1
DB_KINDS = {"credit": 1, "transfer_in": 1, "debit": -1, "transfer_out": -1}
# A transfer locks the lower user id first: the sender's row, or the receiver's.
LOCK_ORDERS = [pytest.param("alice", "bob", id="sender_first"), pytest.param("zed", "bob", id="receiver_first")]


# ---------------------------------------------------------------- helpers


async def credit(
    clients: Clients, user: str, amount: int, request_id: str, *, reason: str = "", reference_id: str = "",
    metadata: Any = SERVICE,
) -> pb.CreditResponse:
    request = pb.CreditRequest(
        user_id=user, amount=amount, reason=reason, reference_id=reference_id, request_id=request_id
    )
    return await clients.tokens.Credit(request, metadata=metadata)


async def deduct(
    clients: Clients, user: str, amount: int, request_id: str, *, reason: str = "", reference_id: str = "",
    metadata: Any = None,
) -> pb.DeductResponse:
    request = pb.DeductRequest(
        user_id=user, amount=amount, reason=reason, reference_id=reference_id, request_id=request_id
    )
    return await clients.tokens.Deduct(request, metadata=metadata or auth(user))


async def transfer(
    clients: Clients, sender: str, receiver: str, amount: int, request_id: str, *, reason: str = "",
    reference_id: str = "", metadata: Any = None,
) -> pb.TransferResponse:
    request = pb.TransferRequest(
        from_user_id=sender, to_user_id=receiver, amount=amount, reason=reason, reference_id=reference_id,
        request_id=request_id,
    )
    return await clients.tokens.Transfer(request, metadata=metadata or auth(sender))


async def get_balances(clients: Clients, users: list[str], metadata: Any = SERVICE) -> list[pb.Balance]:
    response = await clients.tokens.GetBalances(pb.GetBalancesRequest(user_ids=users), metadata=metadata)
    return list(response.balances)


async def balance_of(clients: Clients, user: str) -> int:
    (result,) = await get_balances(clients, [user])
    return result.balance


async def list_page(
    clients: Clients, user: str, page_size: int = 0, page_token: str = "", metadata: Any = SERVICE
) -> pb.ListTransactionsResponse:
    request = pb.ListTransactionsRequest(user_id=user, page_size=page_size, page_token=page_token)
    return await clients.tokens.ListTransactions(request, metadata=metadata)


async def snapshot(db: asyncpg.Connection) -> dict[str, list[str]]:
    """Every row of every ledger table, as text: equal snapshots mean nothing moved."""
    return {t: [r[0] for r in await db.fetch(f"SELECT t::text FROM {t} t ORDER BY 1")] for t in TABLES}


def assert_refused(error: grpc.aio.AioRpcError, violation: str = "INSUFFICIENT_FUNDS") -> None:
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    assert precondition_types(error) == [violation]


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def essentials(t: pb.Transaction) -> tuple[Any, ...]:
    return (t.user_id, t.kind, t.amount, t.balance_after, t.reason, t.reference_id, t.counterparty_user_id,
            t.request_id, t.sequence)


async def ledger(db: asyncpg.Connection, user: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM token_transactions WHERE user_id = $1 ORDER BY sequence", user)


async def assert_ledger_consistent(db: asyncpg.Connection) -> dict[str, int]:
    """Every user's ledger is 1..n with a sound balance_after chain, the balance
    row equals the ledger sum and the last balance_after, nothing is negative,
    and reconcile agrees. Returns the balances."""
    balances = {r["user_id"]: r for r in await db.fetch("SELECT * FROM balances")}
    users = set(balances) | {r[0] for r in await db.fetch("SELECT DISTINCT user_id FROM token_transactions")}
    for user in users:
        rows = await ledger(db, user)
        assert [r["sequence"] for r in rows] == list(range(1, len(rows) + 1)), user
        running = 0
        for r in rows:
            running += DB_KINDS[r["kind"]] * r["amount"]
            assert r["balance_after"] == running, (user, r["sequence"])
            assert running >= 0
        assert user in balances, user
        assert balances[user]["balance"] == running >= 0, user
        assert balances[user]["last_sequence"] == len(rows), user
    assert await db.fetchval("SELECT count(*) FROM reconcile_balances(false)") == 0
    return {u: r["balance"] for u, r in balances.items()}


# ---------------------------------------------------------------- Credit, Deduct, Transfer


@pytest.mark.cluster
async def test_credit_and_deduct_write_ledger_rows_in_sequence(clients: Clients, db: asyncpg.Connection) -> None:
    first = await credit(clients, "alice", 100, "c1", reason="signup bonus", reference_id="promo-7")
    second = await credit(clients, "alice", 50, "c2")
    third = await deduct(clients, "alice", 30, "d1", reason="brief", reference_id="brief-42")

    assert [first.balance, second.balance, third.balance] == [100, 150, 120]
    assert essentials(first.transaction) == (
        "alice", pb.TRANSACTION_KIND_CREDIT, 100, 100, "signup bonus", "promo-7", "", "c1", 1
    )
    assert essentials(second.transaction) == ("alice", pb.TRANSACTION_KIND_CREDIT, 50, 150, "", "", "", "c2", 2)
    assert essentials(third.transaction) == (
        "alice", pb.TRANSACTION_KIND_DEBIT, 30, 120, "brief", "brief-42", "", "d1", 3
    )
    transactions = [first.transaction, second.transaction, third.transaction]
    assert all(is_uuid(t.transaction_id) for t in transactions)
    assert len({t.transaction_id for t in transactions}) == 3
    assert all(t.HasField("create_time") for t in transactions)
    assert [t.create_time.ToDatetime() for t in transactions] == sorted(t.create_time.ToDatetime() for t in transactions)

    rows = await ledger(db, "alice")
    assert [(str(r["transaction_id"]), r["kind"], r["amount"], r["balance_after"]) for r in rows] == [
        (t.transaction_id, k, t.amount, t.balance_after) for t, k in zip(transactions, ["credit", "credit", "debit"], strict=True)
    ]
    assert await balance_of(clients, "alice") == 120
    assert await assert_ledger_consistent(db) == {"alice": 120}


@pytest.mark.parametrize(("sender", "receiver"), LOCK_ORDERS)
@pytest.mark.cluster
async def test_transfer_writes_both_legs(clients: Clients, db: asyncpg.Connection, sender: str, receiver: str) -> None:
    """Both lock orders (the lower user id is locked first) give the same result."""
    await credit(clients, sender, 100, "fund")
    await credit(clients, receiver, 5, "fund")

    response = await transfer(clients, sender, receiver, 40, "t1", reason="tip", reference_id="entry-1")

    out_leg, in_leg = response.transactions
    assert essentials(out_leg) == (
        sender, pb.TRANSACTION_KIND_TRANSFER_OUT, 40, 60, "tip", "entry-1", receiver, "t1", 2
    )
    assert essentials(in_leg) == (
        receiver, pb.TRANSACTION_KIND_TRANSFER_IN, 40, 45, "tip", "entry-1", sender, "t1", 2
    )
    assert out_leg.transaction_id != in_leg.transaction_id
    assert is_uuid(out_leg.transaction_id) and is_uuid(in_leg.transaction_id)
    assert (response.from_balance, response.to_balance) == (60, 45)
    assert [b.balance for b in await get_balances(clients, [sender, receiver])] == [60, 45]
    assert await assert_ledger_consistent(db) == {sender: 60, receiver: 45}


@pytest.mark.cluster
async def test_transfer_to_a_new_user_creates_their_balance(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 10, "fund")

    response = await transfer(clients, "alice", "newcomer", 10, "t1")

    assert (response.from_balance, response.to_balance) == (0, 10)
    assert response.transactions[1].sequence == 1
    assert await assert_ledger_consistent(db) == {"alice": 0, "newcomer": 10}


@pytest.mark.cluster
async def test_get_balances_in_the_order_asked_with_unknown_users_at_zero(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "carol", 7, "c1")
    await credit(clients, "alice", 3, "c1")
    await deduct(clients, "alice", 3, "d1")  # back to 0, but known

    result = await get_balances(clients, ["carol", "nobody", "alice"])

    assert [(b.user_id, b.balance) for b in result] == [("carol", 7), ("nobody", 0), ("alice", 0)]
    assert [b.HasField("update_time") for b in result] == [True, False, True]
    stored = {r["user_id"]: r["update_time"] for r in await db.fetch("SELECT user_id, update_time FROM balances")}
    assert result[0].update_time.ToDatetime() == stored["carol"].replace(tzinfo=None)
    assert result[2].update_time.ToDatetime() == stored["alice"].replace(tzinfo=None)


async def test_get_balances_validates_ids(clients: Clients) -> None:
    error = await rpc_error(get_balances(clients, ["alice", "bad id"]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["user_ids[1]"]

    error = await rpc_error(get_balances(clients, [f"u{i}" for i in range(1001)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["user_ids"]


async def test_list_transactions_newest_first_across_pages(clients: Clients) -> None:
    for i in range(5):
        await credit(clients, "alice", i + 1, f"c{i}")
    await credit(clients, "bob", 1, "c0")  # another user's row, never listed

    pages = await all_pages(
        lambda token: list_page(clients, "alice", page_size=2, page_token=token),
        lambda page: [t.sequence for t in page.transactions],
    )
    everything = (await list_page(clients, "alice")).transactions

    assert pages == [[5, 4], [3, 2], [1]]
    assert [t.amount for t in everything] == [5, 4, 3, 2, 1]
    assert [t.balance_after for t in everything] == [15, 10, 6, 3, 1]
    assert all(t.user_id == "alice" for t in everything)
    assert len({t.transaction_id for t in everything}) == 5


async def test_list_transactions_exact_pages_end_with_an_empty_token(clients: Clients) -> None:
    for i in range(4):
        await credit(clients, "alice", 1, f"c{i}")

    first = await list_page(clients, "alice", page_size=2)
    second = await list_page(clients, "alice", page_size=2, page_token=first.next_page_token)

    assert [t.sequence for t in second.transactions] == [2, 1]
    assert second.next_page_token == ""
    assert (await list_page(clients, "nobody")).transactions == []


async def test_list_transactions_rejects_garbage_and_foreign_page_tokens(clients: Clients) -> None:
    for i in range(3):
        await credit(clients, "alice", 1, f"c{i}")
        await credit(clients, "bob", 1, f"c{i}")
    bobs_token = (await list_page(clients, "bob", page_size=1)).next_page_token
    assert bobs_token

    for bad in ("garbage", "%%%", bobs_token):
        error = await rpc_error(list_page(clients, "alice", page_size=1, page_token=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert bad_request_fields(error) == ["page_token"]
    error = await rpc_error(list_page(clients, "alice", page_size=-1))
    assert bad_request_fields(error) == ["page_size"]


# ---------------------------------------------------------------- refusals write nothing


async def test_deduct_beyond_the_balance_is_refused_and_writes_nothing(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100, "fund")
    before = await snapshot(db)

    assert_refused(await rpc_error(deduct(clients, "alice", 101, "d1")))
    assert_refused(await rpc_error(deduct(clients, "nobody", 1, "d1")))  # no balance row at all
    assert_refused(await rpc_error(deduct(clients, "alice", INT64_MAX, "d2")))

    assert await snapshot(db) == before
    # The refusal is the request's result: once funded, a retry still gets it, a new request_id applies.
    await credit(clients, "alice", 1, "fund-more")
    assert_refused(await rpc_error(deduct(clients, "alice", 101, "d1")))
    applied = await deduct(clients, "alice", 101, "d3")
    assert (applied.balance, applied.transaction.sequence, applied.transaction.request_id) == (0, 3, "d3")
    assert await assert_ledger_consistent(db) == {"alice": 0}


@pytest.mark.parametrize(("sender", "receiver"), LOCK_ORDERS)
@pytest.mark.cluster
async def test_transfer_beyond_the_balance_is_refused_and_writes_nothing(
    clients: Clients, db: asyncpg.Connection, sender: str, receiver: str
) -> None:
    """receiver_first: the credit leg is applied first and must be undone too
    (including the new receiver's balance row)."""
    await credit(clients, sender, 100, "fund")
    before = await snapshot(db)

    assert_refused(await rpc_error(transfer(clients, sender, receiver, 101, "t1")))
    assert_refused(await rpc_error(transfer(clients, "nobody", receiver, 1, "t1", metadata=SERVICE)))

    assert await snapshot(db) == before
    await credit(clients, sender, 1, "fund-more")
    assert_refused(await rpc_error(transfer(clients, sender, receiver, 101, "t1")))
    retried = await transfer(clients, sender, receiver, 101, "t2")
    assert (retried.from_balance, retried.to_balance) == (0, 101)
    assert [t.sequence for t in retried.transactions] == [3, 1]
    assert await assert_ledger_consistent(db) == {sender: 0, receiver: 101}


@pytest.mark.parametrize("receiver", ["aaron", "zoe"], ids=["receiver_first", "sender_first"])
async def test_transfer_beyond_the_balance_is_insufficient_funds_even_if_the_receiver_would_overflow(
    clients: Clients, db: asyncpg.Connection, receiver: str
) -> None:
    """The overdraft rule decides, whichever leg is locked first."""
    await credit(clients, "mike", 5, "fund")
    await credit(clients, receiver, 10, "fund")
    before = await snapshot(db)

    assert_refused(await rpc_error(transfer(clients, "mike", receiver, INT64_MAX - 5, "t1")))

    assert await snapshot(db) == before


async def test_credit_past_int64_is_balance_overflow_and_writes_nothing(clients: Clients, db: asyncpg.Connection) -> None:
    full = await credit(clients, "alice", INT64_MAX, "fund")
    assert full.balance == INT64_MAX
    await credit(clients, "bob", 1, "fund")
    before = await snapshot(db)

    assert_refused(await rpc_error(credit(clients, "alice", 1, "c2")), "BALANCE_OVERFLOW")
    assert_refused(await rpc_error(credit(clients, "bob", INT64_MAX, "c2")), "BALANCE_OVERFLOW")

    assert await snapshot(db) == before
    assert await assert_ledger_consistent(db) == {"alice": INT64_MAX, "bob": 1}


@pytest.mark.parametrize("sender", ["aaron", "zed"], ids=["sender_first", "receiver_first"])
async def test_transfer_into_a_full_balance_is_balance_overflow_and_writes_nothing(
    clients: Clients, db: asyncpg.Connection, sender: str
) -> None:
    await credit(clients, "max", INT64_MAX, "fund")
    await credit(clients, sender, 1, "fund")
    before = await snapshot(db)

    assert_refused(await rpc_error(transfer(clients, sender, "max", 1, "t1")), "BALANCE_OVERFLOW")

    assert await snapshot(db) == before


# ---------------------------------------------------------------- validation


def vcase(rpc: str, field: str, label: str, **overrides: Any) -> Any:
    return pytest.param(rpc, overrides, field, id=f"{rpc}-{field}-{label}")


BASE: dict[str, tuple[type, dict[str, Any]]] = {
    "Credit": (pb.CreditRequest, dict(user_id="alice", amount=5, reason="r", reference_id="ref", request_id="v1")),
    "Deduct": (pb.DeductRequest, dict(user_id="alice", amount=5, reason="r", reference_id="ref", request_id="v1")),
    "Transfer": (
        pb.TransferRequest,
        dict(from_user_id="alice", to_user_id="bob", amount=5, reason="r", reference_id="ref", request_id="v1"),
    ),
}
VALIDATION_CASES = [
    *(
        c
        for rpc in BASE
        for c in (
            vcase(rpc, "amount", "zero", amount=0),
            vcase(rpc, "amount", "negative", amount=-5),
            vcase(rpc, "amount", "int64_min", amount=-(2**63)),
            vcase(rpc, "request_id", "missing", request_id=""),
            vcase(rpc, "request_id", "65_chars", request_id="r" * 65),
            vcase(rpc, "request_id", "space", request_id="req 1"),
            vcase(rpc, "reason", "501_chars", reason="x" * 501),
            vcase(rpc, "reason", "nul", reason="a\x00b"),
            vcase(rpc, "reference_id", "129_chars", reference_id="x" * 129),
        )
    ),
    vcase("Credit", "user_id", "empty", user_id=""),
    vcase("Deduct", "user_id", "bad_chars", user_id="al ice"),
    vcase("Transfer", "from_user_id", "empty", from_user_id=""),
    vcase("Transfer", "to_user_id", "empty", to_user_id=""),
    vcase("Transfer", "to_user_id", "129_chars", to_user_id="b" * 129),
    vcase("Transfer", "to_user_id", "self", to_user_id="alice"),
]


async def test_base_requests_and_boundary_lengths_succeed(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100, "fund")
    for rpc, (cls, fields) in BASE.items():
        await getattr(clients.tokens, rpc)(cls(**{**fields, "request_id": f"{rpc}-base"}), metadata=SERVICE)
        boundary = cls(**{**fields, "reason": "x" * 500, "reference_id": "y" * 128, "request_id": rpc[0] * 64})
        response = await getattr(clients.tokens, rpc)(boundary, metadata=SERVICE)
        legs = list(response.transactions) if rpc == "Transfer" else [response.transaction]
        assert all((len(t.reason), len(t.reference_id), len(t.request_id)) == (500, 128, 64) for t in legs)
    await assert_ledger_consistent(db)


@pytest.mark.refused_in_python
@pytest.mark.parametrize(("rpc", "overrides", "field"), VALIDATION_CASES)
async def test_bad_input_is_invalid_argument_naming_the_field_and_writes_nothing(
    clients: Clients, db: asyncpg.Connection, rpc: str, overrides: dict[str, Any], field: str
) -> None:
    await credit(clients, "alice", 100, "fund")  # so a request that slipped through would really move tokens
    before = await snapshot(db)
    cls, fields = BASE[rpc]

    error = await rpc_error(getattr(clients.tokens, rpc)(cls(**{**fields, **overrides}), metadata=SERVICE))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == [field]
    assert await snapshot(db) == before


# ---------------------------------------------------------------- idempotency


@pytest.mark.cluster
async def test_retries_return_the_original_result_and_move_nothing(clients: Clients, db: asyncpg.Connection) -> None:
    credited = await credit(clients, "alice", 100, "c1", reason="r")
    deducted = await deduct(clients, "alice", 30, "d1")
    transferred = await transfer(clients, "alice", "bob", 20, "t1")
    await credit(clients, "alice", 1000, "c2")  # later movements do not change what a retry returns
    before = await snapshot(db)

    assert await credit(clients, "alice", 100, "c1", reason="r") == credited
    assert await deduct(clients, "alice", 30, "d1") == deducted
    assert await transfer(clients, "alice", "bob", 20, "t1") == transferred
    assert await deduct(clients, "alice", 30, "d1", metadata=SERVICE) == deducted  # whoever sends it

    assert (credited.balance, deducted.balance, transferred.from_balance) == (100, 70, 50)
    assert await snapshot(db) == before
    assert await assert_ledger_consistent(db) == {"alice": 1050, "bob": 20}


async def test_request_ids_are_scoped_to_the_acting_user(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "carol", 10, "fund")
    a = await credit(clients, "alice", 10, "same")
    b = await credit(clients, "bob", 10, "same")
    c = await transfer(clients, "carol", "alice", 1, "same")

    assert len({a.transaction.transaction_id, b.transaction.transaction_id, c.transactions[0].transaction_id}) == 3
    assert [x.balance for x in await get_balances(clients, ["alice", "bob", "carol"])] == [11, 10, 9]
    assert await db.fetchval("SELECT count(*) FROM token_requests WHERE request_id = 'same'") == 3


CHANGED_ARGS = [
    pytest.param(lambda c: credit(c, "alice", 101, "c1", reason="r", reference_id="x"), id="credit-amount"),
    pytest.param(lambda c: credit(c, "alice", 100, "c1", reason="other", reference_id="x"), id="credit-reason"),
    pytest.param(lambda c: credit(c, "alice", 100, "c1", reason="r", reference_id="y"), id="credit-reference_id"),
    pytest.param(lambda c: deduct(c, "alice", 100, "c1", reason="r", reference_id="x"), id="deduct-reusing-credit"),
    pytest.param(lambda c: transfer(c, "alice", "bob", 100, "c1", reason="r", reference_id="x"), id="transfer-reusing-credit"),
    pytest.param(lambda c: deduct(c, "alice", 11, "d1"), id="deduct-amount"),
    pytest.param(lambda c: credit(c, "alice", 10, "d1"), id="credit-reusing-deduct"),
    pytest.param(lambda c: transfer(c, "alice", "carol", 5, "t1"), id="transfer-receiver"),
    pytest.param(lambda c: transfer(c, "alice", "bob", 6, "t1"), id="transfer-amount"),
    pytest.param(lambda c: deduct(c, "alice", 5, "t1"), id="deduct-reusing-transfer"),
]


@pytest.mark.parametrize("changed", CHANGED_ARGS)
async def test_same_request_id_with_other_arguments_is_already_exists(
    clients: Clients, db: asyncpg.Connection, changed: Any
) -> None:
    await credit(clients, "alice", 100, "c1", reason="r", reference_id="x")
    await deduct(clients, "alice", 10, "d1")
    await transfer(clients, "alice", "bob", 5, "t1")
    before = await snapshot(db)

    error = await rpc_error(changed(clients))

    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await snapshot(db) == before


async def concurrent_twenty(clients: Clients, rpc: str) -> list[Any]:
    if rpc == "Credit":
        return await asyncio.gather(*(credit(clients, "alice", 7, "same") for _ in range(20)))
    if rpc == "Deduct":
        return await asyncio.gather(*(deduct(clients, "alice", 7, "same") for _ in range(20)))
    return await asyncio.gather(*(transfer(clients, "alice", "bob", 7, "same") for _ in range(20)))


@pytest.mark.parametrize("rpc", ["Credit", "Deduct", "Transfer"])
@pytest.mark.cluster
async def test_the_same_request_sent_twenty_times_at_once_applies_once(
    clients: Clients, db: asyncpg.Connection, rpc: str
) -> None:
    await credit(clients, "alice", 100, "fund")

    responses = await concurrent_twenty(clients, rpc)

    assert all(r == responses[0] for r in responses)
    expected = {"Credit": {"alice": 107}, "Deduct": {"alice": 93}, "Transfer": {"alice": 93, "bob": 7}}[rpc]
    assert await assert_ledger_consistent(db) == expected
    rows = await db.fetch("SELECT transaction_id::text FROM token_transactions WHERE request_id = 'same'")
    legs = list(responses[0].transactions) if rpc == "Transfer" else [responses[0].transaction]
    assert sorted(r[0] for r in rows) == sorted(t.transaction_id for t in legs)
    assert await db.fetchval("SELECT count(*) FROM token_requests") == 2


# ---------------------------------------------------------------- the bank test


@dataclass(frozen=True)
class Op:
    kind: str  # credit, deduct, transfer
    user: str  # the acting user (payer of a transfer)
    amount: int
    request_id: str
    receiver: str = ""
    as_service: bool = True

    def call(self, clients: Clients) -> Any:
        metadata = SERVICE if self.as_service else auth(self.user)
        if self.kind == "credit":
            return credit(clients, self.user, self.amount, self.request_id)
        if self.kind == "deduct":
            return deduct(clients, self.user, self.amount, self.request_id, metadata=metadata)
        return transfer(clients, self.user, self.receiver, self.amount, self.request_id, metadata=metadata)

    def legs(self, response: Any) -> list[pb.Transaction]:
        return list(response.transactions) if self.kind == "transfer" else [response.transaction]


async def outcome(clients: Clients, op: Op, gate: asyncio.Semaphore) -> Any:
    """The response, or "refused" for INSUFFICIENT_FUNDS, or the unexpected error."""
    async with gate:
        try:
            return await op.call(clients)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION and precondition_types(error) == ["INSUFFICIENT_FUNDS"]:
                return "refused"
            return error


def bank_ops(rng: random.Random, accounts: list[str], count: int) -> list[Op]:
    ops: list[Op] = []
    for i in range(count):
        roll = rng.random()
        user = rng.choice(accounts)
        if roll < 0.6:
            receiver = rng.choice([a for a in accounts if a != user])
            op = Op("transfer", user, rng.randint(1, 900), f"op-{i}", receiver, as_service=rng.random() < 0.5)
        elif roll < 0.8:
            op = Op("deduct", user, rng.randint(1, 400), f"op-{i}", as_service=rng.random() < 0.5)
        else:
            op = Op("credit", user, rng.randint(1, 400), f"op-{i}")
        ops.append(op)
    # Client retries racing their originals: 5% of the requests are sent twice.
    ops += [ops[rng.randrange(count)] for _ in range(count // 20)]
    rng.shuffle(ops)
    return ops


@pytest.mark.cluster
async def test_the_bank_keeps_every_balance_equal_to_its_ledger_under_concurrent_load(
    clients: Clients, db: asyncpg.Connection
) -> None:
    rng = random.Random(20261122)
    accounts = [f"acct{i}" for i in range(10)]
    funding = await asyncio.gather(*(credit(clients, a, 1000, "fund") for a in accounts))
    ops = bank_ops(rng, accounts, 2000)
    pairs = {(o.user, o.receiver) for o in ops if o.kind == "transfer"}
    assert sum((b, a) in pairs for a, b in pairs) >= 50  # opposite directions race (deadlock check)

    # All 2100 calls race; at most 500 are on the wire at once (30x the database
    # pool, so every row lock is contended), below gRPC core's 1000-call server
    # backlog, whose overflow test_a_burst_beyond_the_grpc_backlog_is_not_cancelled covers.
    gate = asyncio.Semaphore(500)
    results = await asyncio.gather(*(outcome(clients, op, gate) for op in ops))

    unexpected = [(op, r) for op, r in zip(ops, results, strict=True) if isinstance(r, grpc.aio.AioRpcError)]
    assert unexpected == [], f"{len(unexpected)} calls failed other than INSUFFICIENT_FUNDS: {unexpected[:3]}"
    # Every send of one request gets its first result: the same transactions, or the same refusal.
    outcomes: dict[Op, Any] = {}
    for op, result in zip(ops, results, strict=True):
        assert outcomes.setdefault(op, result) == result, "a retry returned something else"
    applied = {op: r for op, r in outcomes.items() if r != "refused"}
    refused = {op for op, r in outcomes.items() if r == "refused"}
    assert len(refused) >= 100, "the amounts should make a fair share of requests fail"
    assert len(applied) >= 1000

    # What the successful responses imply ...
    returned: dict[str, pb.Transaction] = {}
    for response in funding:
        returned[response.transaction.transaction_id] = response.transaction
    for op, response in applied.items():
        legs = op.legs(response)
        assert [t.amount for t in legs] == [op.amount] * len(legs)
        for t in legs:
            returned[t.transaction_id] = t
    minted = 10 * 1000 + sum(op.amount for op in applied if op.kind == "credit")
    burned = sum(op.amount for op in applied if op.kind == "deduct")
    expected_rows = len(accounts) + sum(2 if op.kind == "transfer" else 1 for op in applied)
    assert len(returned) == expected_rows

    # ... is exactly what the database holds.
    balances = await assert_ledger_consistent(db)
    assert sum(balances.values()) == minted - burned
    assert all(b >= 0 for b in balances.values())
    served = await get_balances(clients, accounts)
    assert {b.user_id: b.balance for b in served} == balances
    rows = await db.fetch("SELECT * FROM token_transactions")
    assert len(rows) == expected_rows
    for row in rows:
        t = returned[str(row["transaction_id"])]
        assert (t.user_id, t.amount, t.balance_after, t.sequence) == (
            row["user_id"], row["amount"], row["balance_after"], row["sequence"]
        )
    assert await db.fetchval("SELECT count(*) FROM token_requests") == len(accounts) + len(applied) + len(refused)
    # Each account's latest returned balance_after is its balance.
    latest: dict[str, pb.Transaction] = {}
    for t in returned.values():
        if t.user_id not in latest or t.sequence > latest[t.user_id].sequence:
            latest[t.user_id] = t
    assert {u: t.balance_after for u, t in latest.items()} == balances


async def test_a_burst_beyond_the_grpc_backlog_is_not_cancelled(clients: Clients, db: asyncpg.Connection) -> None:
    """2000 unthrottled calls on one channel. Each must succeed, or be refused
    with a retryable overload code (RESOURCE_EXHAUSTED / UNAVAILABLE) having
    written nothing; CANCELLED (which the client never asked for) is not a
    valid answer."""
    accounts = [f"acct{i}" for i in range(10)]

    async def attempt(i: int) -> Any:
        try:
            return await credit(clients, accounts[i % 10], 1, f"burst-{i}")
        except grpc.aio.AioRpcError as error:
            return error.code()

    results = await asyncio.gather(*(attempt(i) for i in range(2000)))

    codes = Counter(r if isinstance(r, grpc.StatusCode) else grpc.StatusCode.OK for r in results)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}, codes
    balances = await assert_ledger_consistent(db)
    assert sum(balances.values()) == codes[grpc.StatusCode.OK]


@pytest.mark.cluster
async def test_a_hot_merchant_receives_every_concurrent_payment(clients: Clients, db: asyncpg.Connection) -> None:
    # Payers on both sides of "merchant" in user id order: both lock orders race.
    payers = [f"{'a' if i % 2 else 'z'}payer{i}" for i in range(500)]
    await asyncio.gather(*(credit(clients, p, 1000, "fund") for p in payers))

    responses = await asyncio.gather(
        *(transfer(clients, p, "merchant", i + 1, "pay", reference_id=f"order-{i}") for i, p in enumerate(payers))
    )

    total = sum(range(1, 501))
    assert sorted(r.to_balance for r in responses)[-1] == total
    assert len({r.to_balance for r in responses}) == 500
    assert all(r.from_balance == 1000 - (i + 1) for i, r in enumerate(responses))
    balances = await assert_ledger_consistent(db)
    assert balances["merchant"] == total
    merchant = await ledger(db, "merchant")
    assert [r["sequence"] for r in merchant] == list(range(1, 501))
    assert sorted(r["counterparty_user_id"] for r in merchant) == sorted(payers)


# ---------------------------------------------------------------- auth


async def test_users_move_only_their_own_tokens(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100, "fund")
    await credit(clients, "mallory", 100, "fund")
    before = await snapshot(db)

    attempts = [
        deduct(clients, "alice", 10, "steal", metadata=auth("mallory")),
        transfer(clients, "alice", "mallory", 10, "steal", metadata=auth("mallory")),
        credit(clients, "mallory", 10, "mint", metadata=auth("mallory")),  # not even for oneself
        credit(clients, "alice", 10, "mint", metadata=auth("mallory")),
    ]
    for attempt in attempts:
        assert (await rpc_error(attempt)).code() == grpc.StatusCode.PERMISSION_DENIED

    assert await snapshot(db) == before


async def test_users_read_only_their_own_balances_and_ledger(clients: Clients) -> None:
    await credit(clients, "alice", 100, "fund")
    await credit(clients, "bob", 5, "fund")

    own = await get_balances(clients, ["alice"], metadata=auth("alice"))
    own_ledger = await list_page(clients, "alice", metadata=auth("alice"))
    assert [b.balance for b in own] == [100]
    assert [t.amount for t in own_ledger.transactions] == [100]

    for call in (
        get_balances(clients, ["bob"], metadata=auth("alice")),
        get_balances(clients, ["alice", "bob"], metadata=auth("alice")),
        list_page(clients, "bob", metadata=auth("alice")),
    ):
        assert (await rpc_error(call)).code() == grpc.StatusCode.PERMISSION_DENIED


async def test_users_deduct_and_transfer_their_own_tokens(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100, "fund")
    assert (await deduct(clients, "alice", 10, "d1", metadata=auth("alice"))).balance == 90
    assert (await transfer(clients, "alice", "bob", 10, "t1", metadata=auth("alice"))).from_balance == 80
    assert await assert_ledger_consistent(db) == {"alice": 80, "bob": 10}


async def test_a_service_acts_for_anyone(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100, "c1", metadata=SERVICE)
    await deduct(clients, "alice", 10, "d1", metadata=SERVICE)
    await transfer(clients, "alice", "bob", 20, "t1", metadata=SERVICE)

    assert [b.balance for b in await get_balances(clients, ["alice", "bob"], metadata=SERVICE)] == [70, 20]
    assert [t.kind for t in (await list_page(clients, "alice", metadata=SERVICE)).transactions] == [
        pb.TRANSACTION_KIND_TRANSFER_OUT, pb.TRANSACTION_KIND_DEBIT, pb.TRANSACTION_KIND_CREDIT
    ]
    assert await assert_ledger_consistent(db) == {"alice": 70, "bob": 20}


NO_TOKEN: tuple[tuple[str, str], ...] = ()
BAD_TOKENS = {
    "none": NO_TOKEN,
    "garbage": (("authorization", "Bearer not.a.jwt"),),
    "not_bearer": (("authorization", f"Basic {token('alice')}"),),
    "expired": (("authorization", f"Bearer {token('alice', ttl_s=-120)}"),),
}


@pytest.mark.parametrize("bad", BAD_TOKENS)
async def test_calls_without_a_valid_token_are_unauthenticated(clients: Clients, db: asyncpg.Connection, bad: str) -> None:
    await credit(clients, "alice", 100, "fund")
    before = await snapshot(db)
    metadata = BAD_TOKENS[bad]
    calls = [
        clients.tokens.Credit(pb.CreditRequest(user_id="alice", amount=1, request_id="x"), metadata=metadata),
        clients.tokens.Deduct(pb.DeductRequest(user_id="alice", amount=1, request_id="x"), metadata=metadata),
        clients.tokens.Transfer(
            pb.TransferRequest(from_user_id="alice", to_user_id="bob", amount=1, request_id="x"), metadata=metadata
        ),
        clients.tokens.GetBalances(pb.GetBalancesRequest(user_ids=["alice"]), metadata=metadata),
        clients.tokens.ListTransactions(pb.ListTransactionsRequest(user_id="alice"), metadata=metadata),
    ]
    for call in calls:
        assert (await rpc_error(call)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert await snapshot(db) == before


# ---------------------------------------------------------------- the ledger is append-only; reconcile


async def test_the_ledger_refuses_updates_and_deletes(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100, "fund")
    before = await snapshot(db)

    for statement in (
        "UPDATE token_transactions SET amount = amount + 1",
        "UPDATE token_transactions SET reason = 'rewritten' WHERE user_id = 'alice'",
        "DELETE FROM token_transactions",
    ):
        with pytest.raises(asyncpg.PostgresError) as info:
            await db.execute(statement)
        assert info.value.sqlstate == "NX403", statement

    assert await snapshot(db) == before


@pytest.mark.cluster
async def test_reconcile_finds_and_repairs_balance_drift(clients: Clients, db: asyncpg.Connection) -> None:
    await credit(clients, "alice", 100, "fund")
    await transfer(clients, "alice", "bob", 30, "t1")
    await db.execute("UPDATE balances SET balance = balance + 1 WHERE user_id = 'alice'")

    found = [tuple(r) for r in await db.fetch("SELECT * FROM reconcile_balances(false)")]
    assert found == [("alice", None, "balance", 71, 70)]
    assert await db.fetchval("SELECT count(*) FROM reconcile_balances(false)") == 1  # false reports only
    assert await balance_of(clients, "alice") == 71

    repaired = [tuple(r) for r in await db.fetch("SELECT * FROM reconcile_balances(true)")]
    assert repaired == [("alice", None, "balance", 71, 70)]
    assert await db.fetchval("SELECT count(*) FROM reconcile_balances(false)") == 0
    assert [b.balance for b in await get_balances(clients, ["alice", "bob"])] == [70, 30]
    assert await assert_ledger_consistent(db) == {"alice": 70, "bob": 30}


async def test_reconcile_reports_a_broken_balance_after_chain(clients: Clients, db: asyncpg.Connection) -> None:
    for i in range(3):
        await credit(clients, "alice", 10, f"c{i}")
    # Only an owner bypassing the trigger can do this; reconcile must still notice.
    # Citus refuses trigger DDL on a distributed table unless this is on (a plain
    # PostgreSQL takes it as an unused placeholder setting).
    await db.execute("SET citus.enable_unsafe_triggers = on")
    await db.execute("ALTER TABLE token_transactions DISABLE TRIGGER token_transactions_append_only")
    await db.execute("UPDATE token_transactions SET balance_after = 99 WHERE user_id = 'alice' AND sequence = 2")
    await db.execute("ALTER TABLE token_transactions ENABLE TRIGGER token_transactions_append_only")

    found = {(r["counter"], r["sequence"]) for r in await db.fetch("SELECT * FROM reconcile_balances(true)")}

    assert ("balance_after", 2) in found and ("balance_after", 3) in found
    assert await balance_of(clients, "alice") == 30  # the balance itself agrees with the ledger sum
