"""SubmitOperations: many ledger operations in one call, each with its own result.

Operations apply in order; each is checked as its own RPC checks it (fields,
acting user) and answers what that RPC would, an error as a google.rpc.Status
naming the field within the call; a chain of linked operations applies all or
none, and when one of them fails the others fail naming it; a retried call
returns the first results; batches racing each other and single calls cannot
deadlock, and every balance still equals its ledger.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from nexus.v1 import token_pb2 as pb

from support.rpc import SERVICE, Clients, auth, bad_request_fields, rpc_error

# The cluster pass of CI keeps the chains (a subtransaction across workers) and the races.


def credit(user: str, amount: int, request_id: str, *, linked: bool = False) -> pb.Operation:
    return pb.Operation(request_id=request_id, linked=linked, credit=pb.CreditRequest(user_id=user, amount=amount))


def transfer(payer: str, payee: str, amount: int, request_id: str, *, linked: bool = False) -> pb.Operation:
    request = pb.TransferRequest(from_user_id=payer, to_user_id=payee, amount=amount, reason="order")
    return pb.Operation(request_id=request_id, linked=linked, transfer=request)


async def submit(clients: Clients, operations: list[pb.Operation], metadata: Any = SERVICE) -> list[pb.OperationResult]:
    request = pb.SubmitOperationsRequest(operations=operations)
    return list((await clients.tokens.SubmitOperations(request, metadata=metadata, timeout=60)).results)


def violation(status: status_pb2.Status) -> tuple[int, list[str]]:
    """The status's code and its precondition types or bad-request fields."""
    found: list[str] = []
    for detail in status.details:
        for kind, field in ((error_details_pb2.PreconditionFailure, "violations"),
                            (error_details_pb2.BadRequest, "field_violations")):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found += [v.type if field == "violations" else v.field for v in getattr(message, field)]
    return status.code, found


FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


async def balance_rows(db: asyncpg.Connection) -> dict[str, int]:
    return {r["user_id"]: r["balance"] for r in await db.fetch("SELECT user_id, balance FROM balances")}


async def assert_reconciled(db: asyncpg.Connection) -> None:
    assert await db.fetch("SELECT * FROM reconcile_balances(false)") == []


@pytest.mark.cluster
async def test_operations_apply_in_order_each_with_its_own_result(clients: Clients, db: asyncpg.Connection) -> None:
    hold = pb.CreatePendingTransferRequest(from_user_id="alice", to_user_id="carol", amount=10)
    results = await submit(clients, [
        credit("alice", 100, "c1"),
        transfer("alice", "bob", 60, "t1"),
        transfer("alice", "bob", 60, "t2"),  # 40 left: refused
        pb.Operation(request_id="d1", deduct=pb.DeductRequest(user_id="bob", amount=0)),  # invalid
        pb.Operation(request_id="h1", create_pending=hold),
    ])

    assert [r.ok for r in results] == [True, True, False, False, True]
    assert results[0].credit.balance == 100
    assert (results[1].transfer.from_balance, results[1].transfer.to_balance) == (40, 60)
    assert [t.kind for t in results[1].transfer.transactions] == [
        pb.TRANSACTION_KIND_TRANSFER_OUT, pb.TRANSACTION_KIND_TRANSFER_IN]
    assert violation(results[2].error) == (FAILED_PRECONDITION, ["INSUFFICIENT_FUNDS"])
    assert violation(results[3].error) == (INVALID_ARGUMENT, ["operations[3].deduct.amount"])
    assert results[4].create_pending.from_balance.available == 30
    assert await balance_rows(db) == {"alice": 40, "bob": 60, "carol": 0}
    await assert_reconciled(db)

    # The same call again returns the first results and applies nothing again.
    again = await submit(clients, [
        credit("alice", 100, "c1"), transfer("alice", "bob", 60, "t1"), transfer("alice", "bob", 60, "t2"),
        pb.Operation(request_id="d1", deduct=pb.DeductRequest(user_id="bob", amount=0)),
        pb.Operation(request_id="h1", create_pending=hold),
    ])
    assert again == results
    assert await balance_rows(db) == {"alice": 40, "bob": 60, "carol": 0}


@pytest.mark.cluster
async def test_a_chain_applies_all_or_none_and_names_the_operation_that_broke_it(
    clients: Clients, db: asyncpg.Connection
) -> None:
    await submit(clients, [credit("buyer", 100, "fund")])
    before = await db.fetch("SELECT t::text FROM token_transactions t ORDER BY 1")
    chain = [
        transfer("buyer", "seller", 70, "pay-seller", linked=True),
        transfer("buyer", "platform", 20, "pay-fee", linked=True),
        transfer("buyer", "referrer", 20, "pay-referrer"),  # 10 left: breaks the chain
    ]
    results = await submit(clients, [*chain, transfer("buyer", "seller", 5, "tip")])

    assert [r.ok for r in results] == [False, False, False, True]
    assert violation(results[2].error) == (FAILED_PRECONDITION, ["INSUFFICIENT_FUNDS"])
    for broken in results[:2]:
        assert violation(broken.error) == (FAILED_PRECONDITION, ["LINKED_OPERATION_FAILED"])
        assert broken.error.message.startswith("operation 2 of its chain failed")
    # Nothing of the chain was written, not even its requests: once funded, the same chain applies.
    assert await balance_rows(db) == {"buyer": 95, "seller": 5}
    assert len(await db.fetch("SELECT t::text FROM token_transactions t")) == len(before) + 2
    assert await db.fetchval(
        "SELECT count(*) FROM token_requests WHERE request_id IN ('pay-seller', 'pay-fee', 'pay-referrer')") == 0
    await submit(clients, [credit("buyer", 15, "fund-more")])
    applied = await submit(clients, chain)
    assert [r.ok for r in applied] == [True, True, True]
    assert await balance_rows(db) == {"buyer": 0, "seller": 75, "platform": 20, "referrer": 20}
    await assert_reconciled(db)


async def test_a_chain_with_an_invalid_operation_is_not_sent(clients: Clients, db: asyncpg.Connection) -> None:
    results = await submit(clients, [
        credit("alice", 100, "c1", linked=True),
        pb.Operation(request_id="t1", transfer=pb.TransferRequest(from_user_id="alice", to_user_id="alice", amount=1)),
        credit("bob", 5, "c2"),
    ])
    assert violation(results[1].error) == (INVALID_ARGUMENT, ["operations[1].transfer.to_user_id"])
    assert violation(results[0].error) == (FAILED_PRECONDITION, ["LINKED_OPERATION_FAILED"])
    assert results[2].ok
    assert await balance_rows(db) == {"bob": 5}


async def test_each_operation_acts_as_its_caller_may(clients: Clients, db: asyncpg.Connection) -> None:
    await submit(clients, [credit("alice", 100, "fund")])
    results = await submit(clients, [
        credit("alice", 5, "mint"),  # Credit needs a service token
        transfer("bob", "alice", 1, "steal"),  # not alice's own tokens
        transfer("alice", "bob", 10, "pay"),
    ], metadata=auth("alice"))
    assert [violation(r.error)[0] for r in results[:2]] == [PERMISSION_DENIED, PERMISSION_DENIED]
    assert results[2].ok and results[2].transfer.from_balance == 90
    assert await balance_rows(db) == {"alice": 90, "bob": 10}


async def test_malformed_calls_are_invalid_naming_the_field(clients: Clients, db: asyncpg.Connection) -> None:
    cases = [
        ([], "operations"),
        ([credit("alice", 1, f"c{i}") for i in range(8191)], "operations"),
        ([credit("alice", 1, "c1", linked=True)], "operations[0].linked"),
    ]
    for operations, field in cases:
        error = await rpc_error(clients.tokens.SubmitOperations(
            pb.SubmitOperationsRequest(operations=operations), metadata=SERVICE))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(error) == [field]
    results = await submit(clients, [
        pb.Operation(request_id="x"),  # no operation
        pb.Operation(credit=pb.CreditRequest(user_id="alice", amount=1)),  # no request_id
        pb.Operation(request_id="y", credit=pb.CreditRequest(user_id="alice", amount=1, request_id="z")),
    ])
    assert [violation(r.error) for r in results] == [
        (INVALID_ARGUMENT, ["operations[0]"]), (INVALID_ARGUMENT, ["operations[1].request_id"]),
        (INVALID_ARGUMENT, ["operations[2].credit.request_id"]),
    ]
    assert await balance_rows(db) == {}


async def test_a_large_call_applies_in_order_whichever_way_it_goes(clients: Clients, db: asyncpg.Connection) -> None:
    """A call of 100 or more movements applies set-based when nothing in it fails (its running
    balances decide, in order), and item by item otherwise: the results are the same either way."""
    # Each hop passes alice's 10 tokens on and back: valid only in this order.
    relay = [credit("alice", 10, "fund")]
    for hop in range(60):
        relay += [transfer("alice", "bob", 10, f"out{hop}"), transfer("bob", "alice", 10, f"back{hop}")]
    results = await submit(clients, relay)
    assert all(r.ok for r in results)
    assert [r.transfer.from_balance for r in results[1::2]] == [0] * 60
    assert await balance_rows(db) == {"alice": 10, "bob": 0}

    # The same call again: every result the first, nothing applied again.
    assert await submit(clients, relay) == results
    # A call in which one item fails: that one is refused, the others apply around it.
    mixed = [transfer("alice", "carol", 1, f"c{n}") for n in range(120)]
    results = await submit(clients, mixed)
    assert [r.ok for r in results] == [True] * 10 + [False] * 110
    assert {violation(r.error)[1][0] for r in results[10:]} == {"INSUFFICIENT_FUNDS"}
    assert await balance_rows(db) == {"alice": 0, "bob": 0, "carol": 10}
    await assert_reconciled(db)


async def test_a_full_call_of_8190_transfers_applies_every_one(clients: Clients, db: asyncpg.Connection) -> None:
    payers = [f"payer{i}" for i in range(90)]
    await submit(clients, [credit(p, 1000, "fund") for p in payers])
    rng = random.Random(3)
    operations = [transfer(rng.choice(payers), f"payee{rng.randrange(500)}", 1, f"t{i}") for i in range(8190)]
    results = await submit(clients, operations)
    assert all(r.ok for r in results)
    assert await db.fetchval("SELECT sum(balance) FROM balances") == 90 * 1000
    assert await db.fetchval("SELECT count(*) FROM token_transactions WHERE kind = 'transfer_in'") == 8190
    await assert_reconciled(db)


@pytest.mark.cluster
async def test_batches_racing_each_other_and_single_calls_keep_the_bank_exact(
    clients: Clients, db: asyncpg.Connection
) -> None:
    """Batches moving tokens both ways between the same users (and chains among them) race single
    Transfers: nothing deadlocks, every acknowledged result is in the ledger, the total is kept."""
    users = [f"u{i}" for i in range(8)]
    await submit(clients, [credit(u, 1000, "fund") for u in users])
    rng = random.Random(11)

    def batch(n: int) -> list[pb.Operation]:
        operations = []
        for k in range(40):
            payer, payee = rng.sample(users, 2)
            operations.append(transfer(payer, payee, rng.randint(1, 80), f"b{n}-{k}", linked=k % 4 < 2))
        return operations

    async def single(n: int) -> pb.TransferResponse | grpc.aio.AioRpcError:
        payer, payee = rng.sample(users, 2)
        request = pb.TransferRequest(from_user_id=payer, to_user_id=payee, amount=rng.randint(1, 80),
                                     request_id=f"s{n}")
        try:
            return await clients.tokens.Transfer(request, metadata=SERVICE, timeout=60)
        except grpc.aio.AioRpcError as error:
            return error

    batches = [batch(n) for n in range(6)]
    outcomes = await asyncio.gather(*(submit(clients, b) for b in batches), *(single(n) for n in range(60)))
    results = [r for batch_results in outcomes[:6] for r in batch_results]
    acknowledged = {t.transaction_id for r in results if r.ok for t in r.transfer.transactions}
    for failed in (r for r in results if not r.ok):
        assert violation(failed.error)[1][0] in ("INSUFFICIENT_FUNDS", "LINKED_OPERATION_FAILED"), failed
    for reply in outcomes[6:]:
        if isinstance(reply, grpc.aio.AioRpcError):
            assert reply.code() == grpc.StatusCode.FAILED_PRECONDITION, reply
        else:
            acknowledged |= {t.transaction_id for t in reply.transactions}
    stored = {str(r[0]) for r in await db.fetch("SELECT transaction_id FROM token_transactions WHERE kind <> 'credit'")}
    assert stored == acknowledged
    assert await db.fetchval("SELECT sum(balance) FROM balances") == 8 * 1000
    await assert_reconciled(db)
