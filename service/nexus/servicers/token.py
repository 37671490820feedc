"""nexus.v1.TokenService.

Credit mints tokens and SetAccountPolicy grants credit lines, so they are for
services only; users move and reserve their own tokens (Deduct, Transfer,
CreatePendingTransfer), resolve their own reservations (services resolve
anyone's), and read their own balances and ledger. Every write is one item of
``apply_token_operations`` (db/functions/tokens.sql), coalesced by group commit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc

from nexus import errors, queries, validation
from nexus.auth import acting_user, current_principal
from nexus.database import Database
from nexus.errors import FailedPrecondition, InvalidArgument, NexusError, PermissionDenied
from nexus.group_commit import GroupCommit
from nexus.pagination import PageTokens
from nexus.v1 import token_pb2 as pb
from nexus.v1 import token_pb2_grpc

KINDS = {
    "credit": pb.TRANSACTION_KIND_CREDIT,
    "debit": pb.TRANSACTION_KIND_DEBIT,
    "transfer_in": pb.TRANSACTION_KIND_TRANSFER_IN,
    "transfer_out": pb.TRANSACTION_KIND_TRANSFER_OUT,
    "pending_out": pb.TRANSACTION_KIND_PENDING_OUT,
    "pending_in": pb.TRANSACTION_KIND_PENDING_IN,
    "pending_voided": pb.TRANSACTION_KIND_PENDING_VOIDED,
    "pending_expired": pb.TRANSACTION_KIND_PENDING_EXPIRED,
}
STATUSES = {
    "pending": pb.PENDING_TRANSFER_STATUS_PENDING,
    "posted": pb.PENDING_TRANSFER_STATUS_POSTED,
    "voided": pb.PENDING_TRANSFER_STATUS_VOIDED,
    "expired": pb.PENDING_TRANSFER_STATUS_EXPIRED,
}
MAX_REASON_CHARS = 500
MAX_REFERENCE_CHARS = 128
MAX_TIMEOUT_SECONDS = 365 * 24 * 3600


def transaction_message(row: Mapping[str, Any]) -> pb.Transaction:
    message = pb.Transaction(
        transaction_id=str(row["transaction_id"]),
        user_id=row["user_id"],
        kind=KINDS[row["kind"]],
        amount=row["amount"],
        balance_after=row["balance_after"],
        reason=row["reason"],
        reference_id=row["reference_id"],
        counterparty_user_id=row["counterparty_user_id"] or "",
        request_id=row["request_id"],
        sequence=row["sequence"],
        pending_transfer_id=row["pending_transfer_id"] or "",
        pending_in_after=row["pending_in_after"],
        pending_out_after=row["pending_out_after"],
    )
    message.create_time.FromDatetime(row["create_time"])
    return message


def balance_after(row: Mapping[str, Any]) -> pb.Balance:
    """The balance of a ledger row's user right after that row."""
    message = pb.Balance(
        user_id=row["user_id"], balance=row["balance_after"], pending_in=row["pending_in_after"],
        pending_out=row["pending_out_after"], available=row["available_after"],
        overdraft_limit=row["overdraft_limit"], closed=row["closed"],
    )
    message.update_time.FromDatetime(row["create_time"])
    return message


def balance_message(row: Mapping[str, Any]) -> pb.Balance:
    message = pb.Balance(
        user_id=row["user_id"], balance=row["balance"], pending_in=row["pending_in"], pending_out=row["pending_out"],
        available=row["available"], overdraft_limit=row["overdraft_limit"], closed=row["closed"],
    )
    if row["update_time"] is not None:
        message.update_time.FromDatetime(row["update_time"])
    return message


def pending_transfer_message(row: Mapping[str, Any]) -> pb.PendingTransfer:
    message = pb.PendingTransfer(
        pending_transfer_id=row["pending_transfer_id"],
        from_user_id=row["from_user_id"],
        to_user_id=row["to_user_id"],
        amount=row["amount"],
        posted_amount=row["posted_amount"],
        status=STATUSES[row["status"]],
        reason=row["reason"],
        reference_id=row["reference_id"],
        request_id=row["request_id"],
    )
    message.create_time.FromDatetime(row["create_time"])
    for field in ("expire_time", "resolve_time"):
        if row[field] is not None:
            getattr(message, field).FromDatetime(row[field])
    return message


def _require_service(what: str) -> None:
    if not current_principal.get().is_service:
        raise PermissionDenied(f"{what} needs a service token")


@dataclass(frozen=True)
class Operation:
    """One ledger operation, checked and authorized: an item of ``apply_token_operations``."""

    op: str
    user_id: str | None  # the initiator (for a post or void: the acting user, None for a service)
    counterparty: str | None
    amount: int
    reason: str | None
    reference_id: str | None
    request_id: str
    pending_id: str | None = None
    timeout_seconds: int | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """What it writes, as group commit keys and routes it: its users, or its pending transfer
        (whose users only the database knows). A transfer is routed by its payer or its payee
        (group_commit: a hot payee's batch goes by the payee)."""
        if self.pending_id is not None and self.op != "create_pending":
            return (self.pending_id,)
        assert self.user_id is not None
        return (self.user_id,) if self.counterparty is None else (self.user_id, self.counterparty)

    def arguments(self, linked: bool = False) -> tuple[Any, ...]:
        """Its item of apply_token_operations' arrays; ``linked``: the next item is of its chain."""
        return (self.user_id, self.op, self.counterparty, self.amount, self.reason, self.reference_id,
                self.request_id, self.pending_id, self.timeout_seconds, linked)


def _movement(op: str, user_id: str, counterparty: str | None, request: Any, request_id: str,
              timeout_seconds: int | None = None) -> Operation:
    """A credit, deduct, transfer or reservation, with the fields they share checked."""
    return Operation(
        op, user_id, counterparty, validation.amount(request.amount),
        validation.text(request.reason, "reason", MAX_REASON_CHARS),
        validation.text(request.reference_id, "reference_id", MAX_REFERENCE_CHARS),
        _request_id(request_id), timeout_seconds=timeout_seconds,
    )


def _request_id(value: str) -> str:
    request_id = validation.request_id(value, required=True)
    assert request_id is not None
    return request_id


def _two_users(request: Any, what: str) -> tuple[str, str]:
    from_user = acting_user(request.from_user_id, "from_user_id")
    to_user = validation.user_id(request.to_user_id, "to_user_id")
    if from_user == to_user:
        raise InvalidArgument("to_user_id", f"cannot {what} oneself")
    return from_user, to_user


def credit_operation(request: pb.CreditRequest, request_id: str) -> Operation:
    user_id = acting_user(request.user_id)
    _require_service("Credit mints tokens and")
    return _movement("credit", user_id, None, request, request_id)


def deduct_operation(request: pb.DeductRequest, request_id: str) -> Operation:
    return _movement("deduct", acting_user(request.user_id), None, request, request_id)


def transfer_operation(request: pb.TransferRequest, request_id: str) -> Operation:
    return _movement("transfer", *_two_users(request, "transfer to"), request, request_id)


def create_pending_operation(request: pb.CreatePendingTransferRequest, request_id: str) -> Operation:
    from_user, to_user = _two_users(request, "reserve tokens for")
    if not 0 <= request.timeout_seconds <= MAX_TIMEOUT_SECONDS:
        raise InvalidArgument("timeout_seconds", f"must be 0 (never) .. {MAX_TIMEOUT_SECONDS}")
    return _movement("create_pending", from_user, to_user, request, request_id, request.timeout_seconds)


def _resolution(op: str, request: Any, request_id: str, amount: int) -> Operation:
    """A post or void: the database checks that the caller is the payer or a service."""
    pending_id = str(validation.entry_id(request.pending_transfer_id, "pending_transfer_id"))
    return Operation(op, current_principal.get().viewer, None, amount, None, None, _request_id(request_id),
                     pending_id=pending_id)


def post_pending_operation(request: pb.PostPendingTransferRequest, request_id: str) -> Operation:
    if request.amount < 0:
        raise InvalidArgument("amount", "must be 0 (all of it) or greater")
    return _resolution("post_pending", request, request_id, request.amount)


def void_pending_operation(request: pb.VoidPendingTransferRequest, request_id: str) -> Operation:
    return _resolution("void_pending", request, request_id, 0)


def credit_response(rows: Sequence[Mapping[str, Any]]) -> pb.CreditResponse:
    (row,) = rows
    return pb.CreditResponse(transaction=transaction_message(row), balance=row["balance_after"])


def deduct_response(rows: Sequence[Mapping[str, Any]]) -> pb.DeductResponse:
    (row,) = rows
    return pb.DeductResponse(transaction=transaction_message(row), balance=row["balance_after"])


def transfer_response(rows: Sequence[Mapping[str, Any]]) -> pb.TransferResponse:
    payer, payee = rows
    return pb.TransferResponse(transactions=[transaction_message(payer), transaction_message(payee)],
                               from_balance=payer["balance_after"], to_balance=payee["balance_after"])


def create_pending_response(rows: Sequence[Mapping[str, Any]]) -> pb.CreatePendingTransferResponse:
    payer, payee = rows
    return pb.CreatePendingTransferResponse(pending_transfer=pending_transfer_message(payer["pending"]),
                                            from_balance=balance_after(payer), to_balance=balance_after(payee))


def post_pending_response(rows: Sequence[Mapping[str, Any]]) -> pb.PostPendingTransferResponse:
    payer, payee = rows
    return pb.PostPendingTransferResponse(
        pending_transfer=pending_transfer_message(payer["pending"]),
        transactions=[transaction_message(payer), transaction_message(payee)],
        from_balance=balance_after(payer), to_balance=balance_after(payee),
    )


def void_pending_response(rows: Sequence[Mapping[str, Any]]) -> pb.VoidPendingTransferResponse:
    payer, _payee = rows
    return pb.VoidPendingTransferResponse(pending_transfer=pending_transfer_message(payer["pending"]),
                                          from_balance=balance_after(payer))


# Per SubmitOperations kind (the Operation oneof): the operation it is, the response it gets.
KINDS_OF_OPERATION: dict[str, tuple[Callable[[Any, str], Operation], Callable[[Sequence[Mapping[str, Any]]], Any]]] = {
    "credit": (credit_operation, credit_response),
    "deduct": (deduct_operation, deduct_response),
    "transfer": (transfer_operation, transfer_response),
    "create_pending": (create_pending_operation, create_pending_response),
    "post_pending": (post_pending_operation, post_pending_response),
    "void_pending": (void_pending_operation, void_pending_response),
}
MAX_OPERATIONS = 8190
LINKED_OPERATION_FAILED = "LINKED_OPERATION_FAILED"


def _checked(operation: pb.Operation, index: int, kind: str | None) -> Operation | NexusError:
    """The operation as its own RPC checks it, or the error that RPC would answer."""
    try:
        if kind is None:
            raise InvalidArgument(f"operations[{index}]", "needs one of " + ", ".join(KINDS_OF_OPERATION))
        inner = getattr(operation, kind)
        if inner.request_id:
            raise InvalidArgument(f"operations[{index}].{kind}.request_id",
                                  "must be empty: the operation's request_id is the one that counts")
        return KINDS_OF_OPERATION[kind][0](inner, operation.request_id)
    except NexusError as error:
        return error


def _chains(linked: Sequence[bool]) -> list[range]:
    """Positions grouped into chains: an operation alone, or linked ones up to the first that is not."""
    chains, start = [], 0
    for i, is_linked in enumerate(linked):
        if not is_linked:
            chains.append(range(start, i + 1))
            start = i + 1
    return chains


def _breaks_its_chain(outcome: object) -> bool:
    """An operation's own failure (not one for another operation of its chain)."""
    return isinstance(outcome, NexusError) and not (
        isinstance(outcome, FailedPrecondition) and outcome.violation_type == LINKED_OPERATION_FAILED
    )


def _within_operation(error: NexusError, index: int, kind: str | None) -> NexusError:
    """The error with the field it names as a path in the SubmitOperations request."""
    if not isinstance(error, InvalidArgument) or error.field.startswith("operations"):
        return error
    field = "request_id" if error.field == "request_id" else f"{kind}.{error.field}"
    return InvalidArgument(f"operations[{index}].{field}", error.description)


class TokenServicer(token_pb2_grpc.TokenServiceServicer):
    def __init__(self, db: Database, page_tokens: PageTokens) -> None:
        self._db = db
        self._tokens = page_tokens
        self._ledger = GroupCommit(db, queries.APPLY_TOKEN_OPERATIONS)

    async def _apply(self, operation: Operation) -> list[asyncpg.Record]:
        keys = operation.keys
        return await self._ledger.submit(keys, keys, *operation.arguments())

    async def Credit(self, request: pb.CreditRequest, context: grpc.aio.ServicerContext) -> pb.CreditResponse:
        return credit_response(await self._apply(credit_operation(request, request.request_id)))

    async def Deduct(self, request: pb.DeductRequest, context: grpc.aio.ServicerContext) -> pb.DeductResponse:
        return deduct_response(await self._apply(deduct_operation(request, request.request_id)))

    async def Transfer(self, request: pb.TransferRequest, context: grpc.aio.ServicerContext) -> pb.TransferResponse:
        return transfer_response(await self._apply(transfer_operation(request, request.request_id)))

    async def CreatePendingTransfer(
        self, request: pb.CreatePendingTransferRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePendingTransferResponse:
        return create_pending_response(await self._apply(create_pending_operation(request, request.request_id)))

    async def PostPendingTransfer(
        self, request: pb.PostPendingTransferRequest, context: grpc.aio.ServicerContext
    ) -> pb.PostPendingTransferResponse:
        return post_pending_response(await self._apply(post_pending_operation(request, request.request_id)))

    async def VoidPendingTransfer(
        self, request: pb.VoidPendingTransferRequest, context: grpc.aio.ServicerContext
    ) -> pb.VoidPendingTransferResponse:
        return void_pending_response(await self._apply(void_pending_operation(request, request.request_id)))

    async def SubmitOperations(
        self, request: pb.SubmitOperationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitOperationsResponse:
        """Checks each operation as its own RPC would, then applies those that pass in one call of
        ``apply_token_operations`` (not through group commit: the call is its own batch). A chain
        with an operation that fails its checks is not sent; one that fails in the database is
        rolled back there; either way its other operations fail naming the one that broke it."""
        operations = request.operations
        if not 1 <= len(operations) <= MAX_OPERATIONS:
            raise InvalidArgument("operations", f"1 to {MAX_OPERATIONS} operations")
        if operations[-1].linked:
            raise InvalidArgument(f"operations[{len(operations) - 1}].linked", "the last operation cannot be "
                                  "linked: a chain ends with an operation whose linked is false")
        kinds = [o.WhichOneof("operation") for o in operations]
        outcomes: list[Operation | NexusError | list[asyncpg.Record]] = [
            _checked(o, i, kind) for i, (o, kind) in enumerate(zip(operations, kinds, strict=True))
        ]
        chains = _chains([o.linked for o in operations])
        unsent = {i for chain in chains if any(isinstance(outcomes[j], NexusError) for j in chain) for i in chain}
        sent = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, Operation) and i not in unsent]
        if sent:
            items = (o.arguments(operations[i].linked) for i, o in sent)
            columns = [list(column) for column in zip(*items, strict=True)]
            rows_of: defaultdict[int, list[asyncpg.Record]] = defaultdict(list)
            for row in await self._db.fetch(queries.APPLY_TOKEN_OPERATIONS, sent[0][1].keys[0], *columns):
                rows_of[sent[row["item"] - 1][0]].append(row)
            for i, _ in sent:
                rows = rows_of[i]
                failed = rows[0] if rows and rows[0]["error_code"] is not None else None
                outcomes[i] = rows if failed is None else errors.from_raised(
                    failed["error_code"], failed["error_message"], failed["error_detail"] or "")
        for chain in chains:
            broken = next((j for j in chain if _breaks_its_chain(outcomes[j])), None)
            if broken is None:
                continue
            for j in chain:
                if j != broken:
                    outcomes[j] = FailedPrecondition(
                        LINKED_OPERATION_FAILED, f"operation {broken} of its chain failed: {outcomes[broken]}")
        response = pb.SubmitOperationsResponse()
        for i, (outcome, kind) in enumerate(zip(outcomes, kinds, strict=True)):
            result = response.results.add()
            if isinstance(outcome, NexusError):
                result.error.CopyFrom(errors.status_message(_within_operation(outcome, i, kind)))
            else:
                assert kind is not None and isinstance(outcome, list)
                result.ok = True
                getattr(result, kind).CopyFrom(KINDS_OF_OPERATION[kind][1](outcome))
        return response

    async def SetAccountPolicy(
        self, request: pb.SetAccountPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAccountPolicyResponse:
        user_id = validation.user_id(request.user_id, "user_id")
        _require_service("SetAccountPolicy")
        if request.overdraft_limit < 0:
            raise InvalidArgument("overdraft_limit", "must be 0 or greater")
        (row,) = await self._db.fetch(queries.SET_ACCOUNT_POLICY, user_id, request.overdraft_limit, request.closed)
        return pb.SetAccountPolicyResponse(balance=balance_message(row))

    async def GetBalances(self, request: pb.GetBalancesRequest, context: grpc.aio.ServicerContext) -> pb.GetBalancesResponse:
        user_ids = validation.user_ids(request.user_ids, "user_ids")
        principal = current_principal.get()
        for i, user_id in enumerate(user_ids):
            principal.require_acting_as(user_id, f"user_ids[{i}]")
        as_of = validation.optional_timestamp(request, "as_of")
        rows = await self._db.fetch(queries.GET_BALANCES, user_ids, as_of)
        return pb.GetBalancesResponse(balances=[balance_message(r) for r in rows])

    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTransactionsResponse:
        user_id = acting_user(request.user_id)
        limit = validation.page_size(request.page_size)
        scope = ("transactions", user_id)
        after = self._tokens.decode_as(scope, request.page_token, (int,))
        rows = await self._db.fetch(
            queries.LIST_TRANSACTIONS, user_id, after[0] if after else None, limit + 1
        )
        page, next_page_token = self._tokens.page(scope, rows, limit, lambda row: [row["sequence"]])
        return pb.ListTransactionsResponse(
            transactions=[transaction_message(r) for r in page], next_page_token=next_page_token
        )
