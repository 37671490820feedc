"""TokenService against a model: random operations on a real server, every reply
and every balance checked against a pure-Python ledger.

A hypothesis ``RuleBasedStateMachine`` drives Credit, Deduct, Transfer,
CreatePendingTransfer, PostPendingTransfer, VoidPendingTransfer and
SetAccountPolicy on four users of its own, as the users themselves or as a
service, with mostly small amounts, now and then ones near int64's maximum or
just at a user's available or headroom, overdraft limits (small, huge, or the
one that takes available to int64's maximum) and closed accounts, so that
every refusal (INSUFFICIENT_FUNDS, BALANCE_OVERFLOW, ACCOUNT_CLOSED,
PENDING_TRANSFER_RESOLVED, a post of more than is reserved, NOT_FOUND,
PERMISSION_DENIED, a self-transfer) comes up. Request ids are now and then
reused, within their scope (the payer; for Credit the credited user; for a
post or void the pending transfer's payer) and across it, and earlier requests
are retried exactly: a retry returns the first result (the same reply, ids and
times included, or the same error, even when today's state would decide
otherwise); the same request id with other arguments is ALREADY_EXISTS.

Each reply is compared whole with the model's (ids and times are checked for
form and taken from the server). After every step: each user's balance,
pending_in, pending_out, available, overdraft_limit, closed and whether
update_time is set are the model's; the balances add up to what was credited
less what was deducted; reservations out equal reservations in, and each
user's equal the open pending transfers; each user's ledger has as many rows
as the model counted (1..n); every pending transfer has the model's status
and posted amount; reconcile_balances finds no drift.

Pending transfers here never expire (timeout 0, or an hour): expiry is
test_pending_transfers' business. The machine is synchronous: it runs in a worker thread
and runs each call on the test's event loop, where the server lives. Each
example has users of its own, so one server and database serve them all.

Seeded and bounded: 30 examples of up to 25 steps, about 800 calls (12 s on two
idle cores). For a longer random exploration:

    NEXUS_LEDGER_MODEL_EXAMPLES=500 ./.venv/bin/pytest tests/service/test_ledger_model.py -q
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from nexus.v1 import token_pb2 as pb

from support.databases import ON_CITUS
from support.rpc import SERVICE, Clients, auth, bad_request_fields, precondition_types

INT64_MAX = 2**63 - 1
_EXAMPLES = os.environ.get("NEXUS_LEDGER_MODEL_EXAMPLES")
SETTINGS = settings(
    # On Citus (not timed there) fewer: each movement is a distributed transaction.
    max_examples=int(_EXAMPLES or (8 if ON_CITUS else 30)),
    stateful_step_count=25,
    derandomize=not _EXAMPLES,  # reproducible in CI; random when exploring
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
USER_NAMES = ("ann", "bob", "cy", "dee")
_EXAMPLE_NUMBERS = itertools.count(1)

# A known departure of the service from the ledger's promises, pinned by an
# xfail test at the end of this file. While it holds, the model expects what
# the service does today; change it once the service is fixed.
#
# A retried CreatePendingTransfer, PostPendingTransfer or VoidPendingTransfer
# shows its Balance messages with today's overdraft_limit and closed, and an
# available of the first balance and pending_out with today's limit: not the
# first reply once the policy changed in between. (That the pending transfer
# is shown as it is now is documented in apply_token_operation, and modelled.)
REPLAY_SHOWS_TODAYS_POLICY = True

T = TypeVar("T")


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class Account:
    balance: int = 0
    pending_in: int = 0
    pending_out: int = 0
    overdraft_limit: int = 0
    closed: bool = False
    rows: int = 0  # ledger rows so far: the sequence of the last one

    @property
    def available(self) -> int:
        return self.balance - self.pending_out + self.overdraft_limit


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    # The precondition type of a FAILED_PRECONDITION, the field of an INVALID_ARGUMENT.
    detail: str = ""


@dataclass
class Claim:
    """A (scope user, request_id) the server has recorded, and what it answered."""

    fingerprint: tuple[Any, ...]
    refusal: Refusal | None
    reply: Message | None
    # (user, balance_after, pending_out_after) of each ledger row it wrote: what a retry re-reads.
    rows: list[tuple[str, int, int]]


@dataclass
class Plan:
    """What the model expects of one request, and what it changes if the server agrees."""

    refusal: Refusal | None = None
    # Expected; fields only the server knows (ids, times) are checked and taken from the reply.
    reply: Message | None = None
    accounts: dict[str, Account] = field(default_factory=dict)
    claim: tuple[str, str] | None = None  # the (scope user, request_id) that records the outcome
    fingerprint: tuple[Any, ...] = ()
    rows: list[tuple[str, int, int]] = field(default_factory=list)
    replay: bool = False
    credited: int = 0
    deducted: int = 0


# A request the machine does not send: one that would take a user's available
# past int64, which the service then shows as int64's maximum (token_available)
# while the model keeps it exact.
SKIP = Plan()


def balance_message(user: str, account: Account) -> pb.Balance:
    return pb.Balance(
        user_id=user, balance=account.balance, pending_in=account.pending_in, pending_out=account.pending_out,
        available=account.available, overdraft_limit=account.overdraft_limit, closed=account.closed,
    )


def row(user: str, account: Account) -> tuple[str, int, int]:
    return (user, account.balance, account.pending_out)


def transaction(
    user: str, account: Account, kind: int, amount: int, request_id: str, *, counterparty: str = "", reason: str = "",
    reference_id: str = "", pending_transfer_id: str = "",
) -> pb.Transaction:
    """The ledger row that leaves ``user`` at ``account``."""
    return pb.Transaction(
        user_id=user, kind=kind, amount=amount, balance_after=account.balance, reason=reason,
        reference_id=reference_id, counterparty_user_id=counterparty, request_id=request_id,
        sequence=account.rows, pending_transfer_id=pending_transfer_id, pending_in_after=account.pending_in,
        pending_out_after=account.pending_out,
    )


def legs(reply: Message) -> list[pb.Transaction]:
    """The ledger rows a reply shows."""
    fields = reply.DESCRIPTOR.fields_by_name
    if "transactions" in fields:
        return list(reply.transactions)  # type: ignore[attr-defined]
    return [reply.transaction] if "transaction" in fields else []  # type: ignore[attr-defined]


def moved(account: Account, balance: int = 0, pending_in: int = 0, pending_out: int = 0) -> Account:
    """The account after one more ledger row that moves these."""
    return replace(
        account, balance=account.balance + balance, pending_in=account.pending_in + pending_in,
        pending_out=account.pending_out + pending_out, rows=account.rows + 1,
    )


def past_int64(*accounts: Account) -> bool:
    return any(a.available > INT64_MAX for a in accounts)


def available_past_int64() -> Plan:
    """What the service does with a request that would take a user's available past int64."""
    return SKIP


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def check(holds: bool, message: str) -> None:
    """An assertion whose message alone is shown (protobuf reprs make pytest's own long)."""
    if not holds:
        raise AssertionError(message)


# ---------------------------------------------------------------- what the rules draw


@dataclass(frozen=True)
class Share:
    """An amount: this percentage of the payer's available (at least 1)."""

    percent: int


@dataclass(frozen=True)
class Edge:
    """An amount: the payer's available plus this (at least 1): all of it, or one too many."""

    plus: int


@dataclass(frozen=True)
class Headroom:
    """An amount: what the user's balance can still take (int64's maximum less balance and
    pending_in) plus this (at least 1): just enough to fill it, or one too many."""

    plus: int


@dataclass(frozen=True)
class Ceiling:
    """An overdraft limit: the one that takes the user's available to int64's maximum plus this."""

    plus: int


Size = int | Share | Edge | Headroom


def amount_of(size: Size, account: Account) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, Share):
        wanted = account.available * size.percent // 100
    elif isinstance(size, Edge):
        wanted = account.available + size.plus
    else:
        wanted = INT64_MAX - account.balance - account.pending_in + size.plus
    return min(max(1, wanted), INT64_MAX)


def limit_of(size: int | Ceiling, account: Account) -> int:
    if isinstance(size, int):
        return size
    return min(max(0, INT64_MAX - account.balance + account.pending_out + size.plus), INT64_MAX)


# Mostly small amounts; now and then ones near int64's maximum, to reach the overflow checks.
SMALL = st.integers(1, 200)
HUGE = st.one_of(st.integers(INT64_MAX - 300, INT64_MAX), st.integers(2**62, INT64_MAX))
CREDITS: st.SearchStrategy[Size] = st.one_of(SMALL, SMALL, SMALL, HUGE, st.builds(Headroom, st.integers(-1, 1)))
DEBITS: st.SearchStrategy[Size] = st.one_of(
    SMALL, SMALL, HUGE, st.builds(Share, st.integers(1, 100)), st.builds(Share, st.integers(1, 100)),
    st.builds(Edge, st.integers(-1, 1)),
)
LIMITS: st.SearchStrategy[int | Ceiling] = st.one_of(
    st.just(0), st.integers(1, 300), st.integers(1, 300), st.integers(2**62, 2**62 + 300),
    st.builds(Ceiling, st.integers(-100, 0)),
)
USERS = st.integers(0, len(USER_NAMES) - 1)
# Another user mostly; now and then the same one (INVALID_ARGUMENT).
OFFSETS = st.sampled_from([1, 2, 3, 1, 2, 3, 1, 2, 3, 0])
# A fresh request id mostly; else one used before in this example (maybe in another scope).
REQUEST_IDS = st.one_of(st.none(), st.none(), st.none(), st.integers(0, 1000))
REASONS = st.sampled_from(["", "", "gift"])
TIMEOUTS = st.sampled_from([0, 0, 0, 3600])  # an hour: an expire_time, and no expiry during the test
RESOLVERS = st.sampled_from(["payer", "service", "payer", "service", "payee"])  # the payee may not
PICKS = st.integers(0, 1000)


# ---------------------------------------------------------------- the machine


@dataclass
class Harness:
    """The test's event loop (where the server and the clients live), run from the machine's thread."""

    loop: asyncio.AbstractEventLoop
    clients: Clients
    db: asyncpg.Connection

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        async def call() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=120)


class LedgerMachine(RuleBasedStateMachine):
    io: ClassVar[Harness]  # set by the test, on a subclass

    def __init__(self) -> None:
        super().__init__()
        prefix = f"lm{next(_EXAMPLE_NUMBERS)}-{uuid.uuid4().hex[:8]}"
        self.users = [f"{prefix}-{name}" for name in USER_NAMES]
        self.accounts = {user: Account() for user in self.users}
        self.pending: dict[str, pb.PendingTransfer] = {}  # as the server shows each now
        self.claims: dict[tuple[str, str], Claim] = {}
        self.request_ids: list[str] = []
        self.sent: list[tuple[str, Message, str | None]] = []  # (method, request, acting user or None: a service)
        self.reserved_or_resolved: list[tuple[str, Message, str | None]] = []  # the pending transfer calls that did
        self.transaction_ids: set[str] = set()
        self.credited = 0
        self.deducted = 0

    # ------------------------------------------------------------ helpers

    def request_id(self, pick: int | None) -> str:
        if pick is None or not self.request_ids:
            self.request_ids.append(f"r{len(self.request_ids) + 1}")
            return self.request_ids[-1]
        return self.request_ids[pick % len(self.request_ids)]

    def pair(self, payer: int, offset: int) -> tuple[str, str]:
        return self.users[payer], self.users[(payer + offset) % len(self.users)]

    def recorded(self, scope: str, request_id: str, fingerprint: tuple[Any, ...]) -> Plan | None:
        """What the server answers for a request id the scope has used: None if unused."""
        claim = self.claims.get((scope, request_id))
        if claim is None:
            return None
        if claim.fingerprint != fingerprint:
            return Plan(refusal=Refusal(grpc.StatusCode.ALREADY_EXISTS))
        if claim.refusal is not None:
            return Plan(refusal=claim.refusal)
        # The retry re-reads the rows and computes available with today's limit.
        if any(
            balance - pending_out + self.accounts[user].overdraft_limit > INT64_MAX
            for user, balance, pending_out in claim.rows
        ):
            return available_past_int64()
        assert claim.reply is not None
        reply = type(claim.reply)()
        reply.CopyFrom(claim.reply)
        if isinstance(reply, pb.CreatePendingTransferResponse | pb.PostPendingTransferResponse | pb.VoidPendingTransferResponse):
            # Documented in apply_token_operation: a pending transfer is shown as it is now.
            reply.pending_transfer.CopyFrom(self.pending[reply.pending_transfer.pending_transfer_id])
            if REPLAY_SHOWS_TODAYS_POLICY:
                for name in ("from_balance", "to_balance"):
                    if name in reply.DESCRIPTOR.fields_by_name:
                        shown = getattr(reply, name)
                        today = self.accounts[shown.user_id]
                        shown.overdraft_limit, shown.closed = today.overdraft_limit, today.closed
                        shown.available = shown.balance - shown.pending_out + today.overdraft_limit
        return Plan(reply=reply, replay=True)

    # ------------------------------------------------------------ what the model expects

    def plan_Credit(self, request: pb.CreditRequest, actor: str | None) -> Plan:
        user, amount = request.user_id, request.amount
        fingerprint = ("credit", None, amount, request.reason, request.reference_id, None, None)
        if (known := self.recorded(user, request.request_id, fingerprint)) is not None:
            return known
        plan = Plan(claim=(user, request.request_id), fingerprint=fingerprint)
        account = self.accounts[user]
        if account.closed:
            plan.refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_CLOSED")
        elif account.balance + account.pending_in + amount > INT64_MAX:
            plan.refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_OVERFLOW")
        else:
            after = moved(account, balance=amount)
            if past_int64(after):
                return available_past_int64()
            plan.accounts = {user: after}
            plan.rows = [row(user, after)]
            plan.credited = amount
            leg = transaction(user, after, pb.TRANSACTION_KIND_CREDIT, amount, request.request_id, reason=request.reason)
            plan.reply = pb.CreditResponse(transaction=leg, balance=after.balance)
        return plan

    def plan_Deduct(self, request: pb.DeductRequest, actor: str | None) -> Plan:
        user, amount = request.user_id, request.amount
        fingerprint = ("deduct", None, amount, request.reason, request.reference_id, None, None)
        if (known := self.recorded(user, request.request_id, fingerprint)) is not None:
            return known
        plan = Plan(claim=(user, request.request_id), fingerprint=fingerprint)
        account = self.accounts[user]
        if account.closed:
            plan.refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_CLOSED")
        elif account.available < amount:
            plan.refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
        else:
            after = moved(account, balance=-amount)
            plan.accounts = {user: after}
            plan.rows = [row(user, after)]
            plan.deducted = amount
            leg = transaction(user, after, pb.TRANSACTION_KIND_DEBIT, amount, request.request_id, reason=request.reason)
            plan.reply = pb.DeductResponse(transaction=leg, balance=after.balance)
        return plan

    def _reserve_or_move(
        self, op: str, payer: str, payee: str, amount: int, request_id: str, fingerprint: tuple[Any, ...]
    ) -> tuple[Plan, Account, Account] | Plan:
        """The checks Transfer and CreatePendingTransfer share; the plan so far and the two accounts."""
        if payer == payee:
            return Plan(refusal=Refusal(grpc.StatusCode.INVALID_ARGUMENT, "to_user_id"))
        if (known := self.recorded(payer, request_id, fingerprint)) is not None:
            return known
        plan = Plan(claim=(payer, request_id), fingerprint=fingerprint)
        source, target = self.accounts[payer], self.accounts[payee]
        if source.closed or target.closed:
            plan.refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_CLOSED")
        elif source.available < amount:
            plan.refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
        elif op == "create_pending" and source.pending_out + amount > INT64_MAX:
            plan.refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_OVERFLOW")
        elif target.balance + target.pending_in + amount > INT64_MAX:
            plan.refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_OVERFLOW")
        else:
            return plan, source, target
        return plan

    def plan_Transfer(self, request: pb.TransferRequest, actor: str | None) -> Plan:
        payer, payee, amount = request.from_user_id, request.to_user_id, request.amount
        fingerprint = ("transfer", payee, amount, request.reason, request.reference_id, None, None)
        checked = self._reserve_or_move("transfer", payer, payee, amount, request.request_id, fingerprint)
        if isinstance(checked, Plan):
            return checked
        plan, source, target = checked
        source, target = moved(source, balance=-amount), moved(target, balance=amount)
        if past_int64(target):
            return available_past_int64()
        plan.accounts = {payer: source, payee: target}
        plan.rows = [row(payer, source), row(payee, target)]
        out_leg = transaction(
            payer, source, pb.TRANSACTION_KIND_TRANSFER_OUT, amount, request.request_id, counterparty=payee,
            reason=request.reason,
        )
        in_leg = transaction(
            payee, target, pb.TRANSACTION_KIND_TRANSFER_IN, amount, request.request_id, counterparty=payer,
            reason=request.reason,
        )
        plan.reply = pb.TransferResponse(
            transactions=[out_leg, in_leg], from_balance=source.balance, to_balance=target.balance
        )
        return plan

    def plan_CreatePendingTransfer(self, request: pb.CreatePendingTransferRequest, actor: str | None) -> Plan:
        payer, payee, amount = request.from_user_id, request.to_user_id, request.amount
        fingerprint = ("create_pending", payee, amount, request.reason, request.reference_id, None, request.timeout_seconds)
        checked = self._reserve_or_move("create_pending", payer, payee, amount, request.request_id, fingerprint)
        if isinstance(checked, Plan):
            return checked
        plan, source, target = checked
        source, target = moved(source, pending_out=amount), moved(target, pending_in=amount)
        plan.accounts = {payer: source, payee: target}
        plan.rows = [row(payer, source), row(payee, target)]
        reserved = pb.PendingTransfer(
            from_user_id=payer, to_user_id=payee, amount=amount, posted_amount=0,
            status=pb.PENDING_TRANSFER_STATUS_PENDING, reason=request.reason, request_id=request.request_id,
        )
        plan.reply = pb.CreatePendingTransferResponse(
            pending_transfer=reserved, from_balance=balance_message(payer, source),
            to_balance=balance_message(payee, target),
        )
        return plan

    def _resolve(self, op: str, pending_transfer_id: str, amount: int, request_id: str, actor: str | None) -> Plan:
        """Post (amount: 0 for all of it) or void: the checks they share, and the moves."""
        pending = self.pending.get(pending_transfer_id)
        if pending is None:
            return Plan(refusal=Refusal(grpc.StatusCode.NOT_FOUND))
        payer, payee = pending.from_user_id, pending.to_user_id
        if actor is not None and actor != payer:
            return Plan(refusal=Refusal(grpc.StatusCode.PERMISSION_DENIED))
        fingerprint = (op, None, amount, None, None, pending_transfer_id, None)
        if (known := self.recorded(payer, request_id, fingerprint)) is not None:
            return known
        plan = Plan(claim=(payer, request_id), fingerprint=fingerprint)
        posted = (amount or pending.amount) if op == "post_pending" else 0
        if pending.status != pb.PENDING_TRANSFER_STATUS_PENDING:
            plan.refusal = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "PENDING_TRANSFER_RESOLVED")
            return plan
        if posted > pending.amount:
            plan.refusal = Refusal(grpc.StatusCode.INVALID_ARGUMENT, "amount")
            return plan
        # Closed accounts still resolve; the reservation needs no funds.
        source = moved(self.accounts[payer], balance=-posted, pending_out=-pending.amount)
        target = moved(self.accounts[payee], balance=posted, pending_in=-pending.amount)
        if past_int64(source, target):
            return available_past_int64()
        plan.accounts = {payer: source, payee: target}
        plan.rows = [row(payer, source), row(payee, target)]
        resolved = pb.PendingTransfer()
        resolved.CopyFrom(pending)
        resolved.posted_amount = posted
        if op == "post_pending":
            resolved.status = pb.PENDING_TRANSFER_STATUS_POSTED
            moves = [
                transaction(
                    user, account, kind, posted, request_id, counterparty=other, reason=pending.reason,
                    reference_id=pending.reference_id, pending_transfer_id=pending_transfer_id,
                )
                for user, account, kind, other in (
                    (payer, source, pb.TRANSACTION_KIND_TRANSFER_OUT, payee),
                    (payee, target, pb.TRANSACTION_KIND_TRANSFER_IN, payer),
                )
            ]
            plan.reply = pb.PostPendingTransferResponse(
                pending_transfer=resolved, transactions=moves, from_balance=balance_message(payer, source),
                to_balance=balance_message(payee, target),
            )
        else:
            resolved.status = pb.PENDING_TRANSFER_STATUS_VOIDED
            plan.reply = pb.VoidPendingTransferResponse(
                pending_transfer=resolved, from_balance=balance_message(payer, source)
            )
        return plan

    def plan_PostPendingTransfer(self, request: pb.PostPendingTransferRequest, actor: str | None) -> Plan:
        return self._resolve("post_pending", request.pending_transfer_id, request.amount, request.request_id, actor)

    def plan_VoidPendingTransfer(self, request: pb.VoidPendingTransferRequest, actor: str | None) -> Plan:
        return self._resolve("void_pending", request.pending_transfer_id, 0, request.request_id, actor)

    def plan_SetAccountPolicy(self, request: pb.SetAccountPolicyRequest, actor: str | None) -> Plan:
        user = request.user_id
        after = replace(self.accounts[user], overdraft_limit=request.overdraft_limit, closed=request.closed)
        if past_int64(after):
            return available_past_int64()
        return Plan(accounts={user: after}, reply=pb.SetAccountPolicyResponse(balance=balance_message(user, after)))

    # ------------------------------------------------------------ sending and checking

    def perform(self, method: str, request: Message, actor: str | None, *, retried_later: bool = True) -> None:
        """Sends one request as ``actor`` (None: a service), checks the answer against the
        model's and, when they agree, moves the model. With retried_later, the retry rule
        may send it again."""
        plan: Plan = getattr(self, f"plan_{method}")(request, actor)
        if plan is SKIP:
            return
        if retried_later:
            self.sent.append((method, request, actor))
            if method.endswith("PendingTransfer") and plan.reply is not None and not plan.replay:
                self.reserved_or_resolved.append((method, request, actor))
        metadata = SERVICE if actor is None else auth(actor)
        call = getattr(self.io.clients.tokens, method)
        reply: Message | None = None
        error: grpc.aio.AioRpcError | None = None
        try:
            reply = self.io.run(lambda: call(request, metadata=metadata, timeout=30))
        except grpc.aio.AioRpcError as failed:
            error = failed
        what = f"{method} as {actor or 'a service'}{' (a retry)' if plan.replay else ''}:\n{request}"
        if plan.refusal is not None:
            if error is None:
                raise AssertionError(f"{what}succeeded; the model expected {plan.refusal}; the reply:\n{reply}")
            code, detail = error.code(), ""
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                detail = ",".join(precondition_types(error))
            elif code == grpc.StatusCode.INVALID_ARGUMENT:
                detail = ",".join(bad_request_fields(error))
            if Refusal(code, detail) != plan.refusal:
                raise AssertionError(
                    f"{what}failed with {code.name} {detail} ({error.details()}); the model expected {plan.refusal}"
                )
        else:
            if error is not None:
                raise AssertionError(f"{what}failed: {error.code().name} {error.details()}; the model expected:\n{plan.reply}")
            assert reply is not None and plan.reply is not None
            if not plan.replay:
                self.adopt_server_fields(request, plan.reply, reply)
            if reply != plan.reply:
                raise AssertionError(f"{what}the model expected:\n{plan.reply}the server answered:\n{reply}")
        self.commit(plan, reply)

    def adopt_server_fields(self, request: Message, expected: Message, actual: Message) -> None:
        """Checks the fields only the server knows (ids, times) and copies them into the expectation."""
        shown, wanted = legs(actual), legs(expected)
        if len(shown) == len(wanted):
            for want, got in zip(wanted, shown, strict=True):
                check(is_uuid(got.transaction_id) and got.transaction_id not in self.transaction_ids,
                      f"a new transaction id expected:\n{actual}")
                check(got.HasField("create_time"), f"no create_time:\n{actual}")
                want.transaction_id = got.transaction_id
                want.create_time.CopyFrom(got.create_time)
        if isinstance(actual, pb.CreatePendingTransferResponse):
            assert isinstance(expected, pb.CreatePendingTransferResponse)
            assert isinstance(request, pb.CreatePendingTransferRequest)
            got_pending, want_pending = actual.pending_transfer, expected.pending_transfer
            check(is_uuid(got_pending.pending_transfer_id) and got_pending.pending_transfer_id not in self.pending,
                  f"a new pending transfer id expected:\n{actual}")
            check(got_pending.HasField("create_time") and not got_pending.HasField("resolve_time"), str(actual))
            check(got_pending.HasField("expire_time") == (request.timeout_seconds > 0),
                  f"expire_time set iff timeout_seconds > 0:\n{actual}")
            want_pending.pending_transfer_id = got_pending.pending_transfer_id
            want_pending.create_time.CopyFrom(got_pending.create_time)
            if got_pending.HasField("expire_time"):
                want_pending.expire_time.CopyFrom(got_pending.expire_time)
        if isinstance(actual, pb.PostPendingTransferResponse | pb.VoidPendingTransferResponse):
            assert isinstance(expected, pb.PostPendingTransferResponse | pb.VoidPendingTransferResponse)
            check(actual.pending_transfer.HasField("resolve_time"), f"no resolve_time:\n{actual}")
            expected.pending_transfer.resolve_time.CopyFrom(actual.pending_transfer.resolve_time)
        # A reply's Balance is as of its ledger row: updated then.
        for name, leg in (("from_balance", 0), ("to_balance", 1)):
            balance = getattr(actual, name, None)
            if isinstance(balance, pb.Balance):
                if not balance.HasField("update_time"):
                    raise AssertionError(f"no {name}.update_time:\n{actual}")
                if len(shown) == 2 and balance.update_time != shown[leg].create_time:
                    raise AssertionError(f"{name}.update_time is not its ledger row's create_time:\n{actual}")
                getattr(expected, name).update_time.CopyFrom(balance.update_time)
        if isinstance(actual, pb.SetAccountPolicyResponse):
            assert isinstance(expected, pb.SetAccountPolicyResponse)
            # Unset for a user who never had a movement.
            moved_before = self.accounts[actual.balance.user_id].rows > 0
            check(actual.balance.HasField("update_time") == moved_before, f"update_time:\n{actual}")
            if moved_before:
                expected.balance.update_time.CopyFrom(actual.balance.update_time)

    def commit(self, plan: Plan, reply: Message | None) -> None:
        self.accounts.update(plan.accounts)
        self.credited += plan.credited
        self.deducted += plan.deducted
        if plan.claim is not None and not plan.replay:
            self.claims[plan.claim] = Claim(plan.fingerprint, plan.refusal, reply, plan.rows)
        if reply is None or plan.replay:
            return
        self.transaction_ids.update(t.transaction_id for t in legs(reply))
        if isinstance(reply, pb.CreatePendingTransferResponse | pb.PostPendingTransferResponse | pb.VoidPendingTransferResponse):
            shown = pb.PendingTransfer()
            shown.CopyFrom(reply.pending_transfer)
            self.pending[shown.pending_transfer_id] = shown

    # ------------------------------------------------------------ rules

    @initialize(
        funds=st.lists(st.integers(0, 1000), min_size=len(USER_NAMES), max_size=len(USER_NAMES)),
        reservations=st.lists(st.tuples(USERS, st.integers(1, 3), st.integers(1, 50)), max_size=3),
    )
    def begin(self, funds: list[int], reservations: list[tuple[int, int, int]]) -> None:
        """Some tokens and reservations to begin with, so that movements succeed about as often
        as they are refused, and posts and voids have something to resolve."""
        for user, amount in zip(self.users, funds, strict=True):
            if amount:
                request = pb.CreditRequest(user_id=user, amount=amount, request_id=self.request_id(None))
                self.perform("Credit", request, None, retried_later=False)
        for payer, offset, percent in reservations:
            source, target = self.pair(payer, offset)
            if self.accounts[source].available > 0:
                request = pb.CreatePendingTransferRequest(
                    from_user_id=source, to_user_id=target, amount=amount_of(Share(percent), self.accounts[source]),
                    request_id=self.request_id(None),
                )
                self.perform("CreatePendingTransfer", request, None, retried_later=False)

    @rule(user=USERS, size=CREDITS, reason=REASONS, pick=REQUEST_IDS)
    def credit(self, user: int, size: Size, reason: str, pick: int | None) -> None:
        amount = amount_of(size, self.accounts[self.users[user]])
        request = pb.CreditRequest(user_id=self.users[user], amount=amount, reason=reason, request_id=self.request_id(pick))
        self.perform("Credit", request, None)

    @rule(user=USERS, size=DEBITS, reason=REASONS, pick=REQUEST_IDS, as_service=st.booleans())
    def deduct(self, user: int, size: Size, reason: str, pick: int | None, as_service: bool) -> None:
        amount = amount_of(size, self.accounts[self.users[user]])
        request = pb.DeductRequest(user_id=self.users[user], amount=amount, reason=reason, request_id=self.request_id(pick))
        self.perform("Deduct", request, None if as_service else self.users[user])

    @rule(payer=USERS, offset=OFFSETS, size=DEBITS, reason=REASONS, pick=REQUEST_IDS, as_service=st.booleans())
    def transfer(self, payer: int, offset: int, size: Size, reason: str, pick: int | None, as_service: bool) -> None:
        source, target = self.pair(payer, offset)
        amount = amount_of(size, self.accounts[source])
        request = pb.TransferRequest(
            from_user_id=source, to_user_id=target, amount=amount, reason=reason, request_id=self.request_id(pick)
        )
        self.perform("Transfer", request, None if as_service else source)

    @rule(
        payer=USERS, offset=OFFSETS, size=DEBITS, timeout=TIMEOUTS, reason=REASONS, pick=REQUEST_IDS,
        as_service=st.booleans(),
    )
    def create_pending(
        self, payer: int, offset: int, size: Size, timeout: int, reason: str, pick: int | None, as_service: bool
    ) -> None:
        source, target = self.pair(payer, offset)
        amount = amount_of(size, self.accounts[source])
        request = pb.CreatePendingTransferRequest(
            from_user_id=source, to_user_id=target, amount=amount, timeout_seconds=timeout, reason=reason,
            request_id=self.request_id(pick),
        )
        self.perform("CreatePendingTransfer", request, None if as_service else source)

    def pick_pending(self, which: int, open_only: bool) -> pb.PendingTransfer:
        """A pending transfer of this example (with open_only, an open one if there is one);
        now and then one that does not exist (NOT_FOUND, and no request id is spent)."""
        candidates = list(self.pending.values())
        still_open = [p for p in candidates if p.status == pb.PENDING_TRANSFER_STATUS_PENDING]
        if open_only and still_open:
            candidates = still_open
        if which % 10 == 0:
            unknown = pb.PendingTransfer()
            unknown.CopyFrom(candidates[which % len(candidates)])
            unknown.pending_transfer_id = str(uuid.uuid4())
            return unknown
        return candidates[which % len(candidates)]

    @staticmethod
    def resolver(pending: pb.PendingTransfer, actor: str) -> str | None:
        if actor == "service":
            return None
        return pending.from_user_id if actor == "payer" else pending.to_user_id  # the payee may not

    @precondition(lambda self: self.pending)
    @rule(
        which=PICKS, open_only=st.sampled_from([True, True, False]), share=st.integers(0, 120), pick=REQUEST_IDS,
        actor=RESOLVERS,
    )
    def post_pending(self, which: int, open_only: bool, share: int, pick: int | None, actor: str) -> None:
        """share: 0 posts all of it (amount 0), 1-100 that percentage (at least 1), above 100 more than reserved."""
        pending = self.pick_pending(which, open_only)
        reserved = pending.amount
        if share == 0:
            amount = 0
        elif share <= 100 or reserved + share - 100 > INT64_MAX:
            amount = max(1, reserved * min(share, 100) // 100)
        else:
            amount = reserved + share - 100
        request = pb.PostPendingTransferRequest(
            pending_transfer_id=pending.pending_transfer_id, amount=amount, request_id=self.request_id(pick)
        )
        self.perform("PostPendingTransfer", request, self.resolver(pending, actor))

    @precondition(lambda self: self.pending)
    @rule(which=PICKS, open_only=st.sampled_from([True, True, False]), pick=REQUEST_IDS, actor=RESOLVERS)
    def void_pending(self, which: int, open_only: bool, pick: int | None, actor: str) -> None:
        pending = self.pick_pending(which, open_only)
        request = pb.VoidPendingTransferRequest(
            pending_transfer_id=pending.pending_transfer_id, request_id=self.request_id(pick)
        )
        self.perform("VoidPendingTransfer", request, self.resolver(pending, actor))

    @rule(user=USERS, size=LIMITS, closed=st.sampled_from([False, False, False, True]))
    def set_policy(self, user: int, size: int | Ceiling, closed: bool) -> None:
        self.change_policy(self.users[user], size, closed)

    def change_policy(self, user: str, size: int | Ceiling, closed: bool) -> None:
        request = pb.SetAccountPolicyRequest(user_id=user, overdraft_limit=limit_of(size, self.accounts[user]), closed=closed)
        self.perform("SetAccountPolicy", request, None)

    @rule(which=PICKS, pending_first=st.booleans())
    def retry(self, which: int, pending_first: bool) -> None:
        """An earlier request again, exactly (the same arguments, request id and caller); with
        pending_first one that reserved, posted or voided, if any did (its reply shows balances)."""
        earlier = self.reserved_or_resolved if pending_first and self.reserved_or_resolved else self.sent
        if earlier:
            self.perform(*earlier[which % len(earlier)])

    @precondition(lambda self: self.reserved_or_resolved)
    @rule(which=PICKS, payee=st.booleans(), size=LIMITS, closed=st.booleans())
    def retry_after_a_policy_change(self, which: int, payee: bool, size: int | Ceiling, closed: bool) -> None:
        """A reservation, post or void that succeeded, retried once its payer's or payee's
        overdraft limit or closed changed: the first reply again."""
        method, request, actor = self.reserved_or_resolved[which % len(self.reserved_or_resolved)]
        if isinstance(request, pb.CreatePendingTransferRequest):
            parties = (request.from_user_id, request.to_user_id)
        else:
            assert isinstance(request, pb.PostPendingTransferRequest | pb.VoidPendingTransferRequest)
            pending = self.pending[request.pending_transfer_id]
            parties = (pending.from_user_id, pending.to_user_id)
        self.change_policy(parties[payee], size, closed)
        self.perform(method, request, actor)

    # ------------------------------------------------------------ invariants

    @invariant()
    def the_server_agrees(self) -> None:
        clients, db = self.io.clients, self.io.db

        async def observe() -> tuple[list[pb.Balance], int, dict[str, tuple[str, int]], dict[str, tuple[int, int]]]:
            reply = await clients.tokens.GetBalances(pb.GetBalancesRequest(user_ids=self.users), metadata=SERVICE, timeout=30)
            drift = await db.fetchval("SELECT count(*) FROM reconcile_balances(false)")
            pending = await db.fetch(
                "SELECT pending_transfer_id::text AS id, status::text, posted_amount FROM pending_transfers"
                " WHERE from_user_id = ANY ($1::text[])",
                self.users,
            )
            ledger = await db.fetch(
                "SELECT user_id, count(*) AS n, max(sequence) AS last FROM token_transactions"
                " WHERE user_id = ANY ($1::text[]) GROUP BY user_id",
                self.users,
            )
            return (
                list(reply.balances), drift, {r["id"]: (r["status"], r["posted_amount"]) for r in pending},
                {r["user_id"]: (r["n"], r["last"]) for r in ledger},
            )

        balances, drift, pending, ledger = self.io.run(observe)
        assert [b.user_id for b in balances] == self.users
        for shown in balances:
            account = self.accounts[shown.user_id]
            # update_time: unset for a user who never had a movement.
            check(shown.HasField("update_time") == (account.rows > 0), f"GetBalances: update_time of\n{shown}")
            shown.ClearField("update_time")
            check(shown == balance_message(shown.user_id, account), f"GetBalances:\n{shown}the model: {account}")
        assert sum(a.balance for a in self.accounts.values()) == self.credited - self.deducted
        assert sum(a.pending_out for a in self.accounts.values()) == sum(a.pending_in for a in self.accounts.values())
        still_open = [p for p in self.pending.values() if p.status == pb.PENDING_TRANSFER_STATUS_PENDING]
        for user, account in self.accounts.items():
            assert account.pending_out == sum(p.amount for p in still_open if p.from_user_id == user)
            assert account.pending_in == sum(p.amount for p in still_open if p.to_user_id == user)
        assert drift == 0, "reconcile_balances(false) found drift"
        statuses = {"pending": 1, "posted": 2, "voided": 3, "expired": 4}
        assert {pid: (statuses[status], posted) for pid, (status, posted) in pending.items()} == {
            pid: (p.status, p.posted_amount) for pid, p in self.pending.items()
        }
        assert ledger == {user: (a.rows, a.rows) for user, a in self.accounts.items() if a.rows}


async def test_the_ledger_agrees_with_a_model_of_it(clients: Clients, db: asyncpg.Connection) -> None:
    machine = type("BoundLedgerMachine", (LedgerMachine,), {"io": Harness(asyncio.get_running_loop(), clients, db)})
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=SETTINGS)


# ---------------------------------------------------------------- the known departures, pinned


async def _balance_of(clients: Clients, user: str) -> pb.Balance:
    reply = await clients.tokens.GetBalances(pb.GetBalancesRequest(user_ids=[user]), metadata=SERVICE)
    return reply.balances[0]


async def test_a_debit_is_not_refused_for_reservations_it_does_not_make(clients: Clients) -> None:
    tokens = clients.tokens
    await tokens.SetAccountPolicy(pb.SetAccountPolicyRequest(user_id="ann", overdraft_limit=INT64_MAX), metadata=SERVICE)
    await tokens.CreatePendingTransfer(
        pb.CreatePendingTransferRequest(from_user_id="ann", to_user_id="bob", amount=INT64_MAX - 5, request_id="p"),
        metadata=SERVICE,
    )
    await tokens.Credit(pb.CreditRequest(user_id="ann", amount=10, request_id="c"), metadata=SERVICE)
    assert (await _balance_of(clients, "ann")).available == 15

    # pending_out + 7 passes int64, but a debit reserves nothing. The first operation
    # fails, so the batch goes item by item (as everything does on Citus).
    submitted = await tokens.SubmitOperations(
        pb.SubmitOperationsRequest(
            operations=[
                pb.Operation(request_id="x", deduct=pb.DeductRequest(user_id="penniless", amount=1)),
                pb.Operation(request_id="d", deduct=pb.DeductRequest(user_id="ann", amount=7)),
            ]
        ),
        metadata=SERVICE,
    )

    assert [r.ok for r in submitted.results] == [False, True], submitted.results[1].error.message
    assert submitted.results[1].deduct.balance == 3


async def test_releasing_a_reservation_past_an_int64_available_is_not_internal(clients: Clients) -> None:
    """available = balance - pending_out + overdraft_limit can pass int64 when a reservation
    is released: the void fails with INTERNAL. Had it a timeout, the expiry sweep would fail
    on it too, and (soonest due first, one statement) on every tick, so that no reservation
    of anyone expires any more."""
    tokens = clients.tokens
    await tokens.SetAccountPolicy(pb.SetAccountPolicyRequest(user_id="ann", overdraft_limit=INT64_MAX - 100), metadata=SERVICE)
    reserved = await tokens.CreatePendingTransfer(
        pb.CreatePendingTransferRequest(from_user_id="ann", to_user_id="bob", amount=1000, request_id="p"),
        metadata=SERVICE,
    )
    await tokens.Credit(pb.CreditRequest(user_id="ann", amount=500, request_id="c"), metadata=SERVICE)
    assert (await _balance_of(clients, "ann")).available == INT64_MAX - 600

    void = pb.VoidPendingTransferRequest(pending_transfer_id=reserved.pending_transfer.pending_transfer_id, request_id="v")
    try:
        await tokens.VoidPendingTransfer(void, metadata=SERVICE)
    except grpc.aio.AioRpcError as error:
        assert error.code() != grpc.StatusCode.INTERNAL, error.details()


@pytest.mark.xfail(strict=True, reason="REPLAY_SHOWS_TODAYS_POLICY: a retry shows today's overdraft limit and closed")
async def test_a_retried_reservation_shows_the_first_balances(clients: Clients) -> None:
    tokens = clients.tokens
    await tokens.Credit(pb.CreditRequest(user_id="ann", amount=100, request_id="c"), metadata=SERVICE)
    request = pb.CreatePendingTransferRequest(from_user_id="ann", to_user_id="bob", amount=10, request_id="p")
    first = await tokens.CreatePendingTransfer(request, metadata=SERVICE)
    await tokens.SetAccountPolicy(pb.SetAccountPolicyRequest(user_id="ann", overdraft_limit=7, closed=True), metadata=SERVICE)

    retried = await tokens.CreatePendingTransfer(request, metadata=SERVICE)

    assert retried.from_balance == first.from_balance  # available 90, overdraft_limit 0, open
