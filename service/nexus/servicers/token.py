"""nexus.v1.TokenService.

Credit mints tokens and SetAccountPolicy grants credit lines, so they are for
services only; users move and reserve their own tokens (Deduct, Transfer,
CreatePendingTransfer), resolve their own reservations (services resolve
anyone's), and read their own balances and ledger. Every write is one item of
``apply_token_operations`` (db/functions/tokens.sql), coalesced by group commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
import grpc

from nexus import queries, validation
from nexus.auth import Principal, acting_user, current_principal
from nexus.database import Database
from nexus.errors import InvalidArgument, PermissionDenied
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


def _require_service(principal: Principal, what: str) -> None:
    if not principal.is_service:
        raise PermissionDenied(f"{what} needs a service token")


class TokenServicer(token_pb2_grpc.TokenServiceServicer):
    def __init__(self, db: Database, page_tokens: PageTokens) -> None:
        self._db = db
        self._tokens = page_tokens
        self._ledger = GroupCommit(db, queries.APPLY_TOKEN_OPERATIONS)

    async def _move(
        self, op: str, user_id: str, counterparty: str | None, request: Any, timeout_seconds: int | None = None
    ) -> list[asyncpg.Record]:
        """Validates the fields every movement shares, applies one (credit, deduct, transfer or
        create_pending) and returns its ledger rows."""
        amount = validation.amount(request.amount)
        reason = validation.text(request.reason, "reason", MAX_REASON_CHARS)
        reference_id = validation.text(request.reference_id, "reference_id", MAX_REFERENCE_CHARS)
        request_id = validation.request_id(request.request_id, required=True)
        # A transfer is routed by its payer or its payee (group_commit: a hot payee's batch goes by the payee).
        keys = (user_id,) if counterparty is None else (user_id, counterparty)
        return await self._ledger.submit(
            keys, keys, user_id, op, counterparty, amount, reason, reference_id, request_id, None, timeout_seconds
        )

    async def _resolve(self, op: str, request: Any, amount: int) -> list[asyncpg.Record]:
        """Posts or voids a pending transfer (the database checks that the caller is its payer or a
        service, and finds its users); returns its ledger rows."""
        pending_id = str(validation.entry_id(request.pending_transfer_id, "pending_transfer_id"))
        request_id = validation.request_id(request.request_id, required=True)
        acting = current_principal.get().viewer
        # Keyed and routed by the pending transfer: its users are known only to the database.
        keys = (pending_id,)
        return await self._ledger.submit(
            keys, keys, acting, op, None, amount, None, None, request_id, pending_id, None
        )

    async def _credit_or_deduct(self, request: pb.CreditRequest | pb.DeductRequest, op: str) -> pb.Transaction:
        user_id = acting_user(request.user_id)
        if op == "credit":
            _require_service(current_principal.get(), "Credit mints tokens and")
        (row,) = await self._move(op, user_id, None, request)
        return transaction_message(row)

    async def Credit(self, request: pb.CreditRequest, context: grpc.aio.ServicerContext) -> pb.CreditResponse:
        transaction = await self._credit_or_deduct(request, "credit")
        return pb.CreditResponse(transaction=transaction, balance=transaction.balance_after)

    async def Deduct(self, request: pb.DeductRequest, context: grpc.aio.ServicerContext) -> pb.DeductResponse:
        transaction = await self._credit_or_deduct(request, "deduct")
        return pb.DeductResponse(transaction=transaction, balance=transaction.balance_after)

    async def Transfer(self, request: pb.TransferRequest, context: grpc.aio.ServicerContext) -> pb.TransferResponse:
        from_user = acting_user(request.from_user_id, "from_user_id")
        to_user = validation.user_id(request.to_user_id, "to_user_id")
        if from_user == to_user:
            raise InvalidArgument("to_user_id", "cannot transfer to oneself")
        out_leg, in_leg = (transaction_message(r) for r in await self._move("transfer", from_user, to_user, request))
        return pb.TransferResponse(
            transactions=[out_leg, in_leg], from_balance=out_leg.balance_after, to_balance=in_leg.balance_after
        )

    async def CreatePendingTransfer(
        self, request: pb.CreatePendingTransferRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePendingTransferResponse:
        from_user = acting_user(request.from_user_id, "from_user_id")
        to_user = validation.user_id(request.to_user_id, "to_user_id")
        if from_user == to_user:
            raise InvalidArgument("to_user_id", "cannot reserve tokens for oneself")
        if not 0 <= request.timeout_seconds <= MAX_TIMEOUT_SECONDS:
            raise InvalidArgument("timeout_seconds", f"must be 0 (never) .. {MAX_TIMEOUT_SECONDS}")
        payer, payee = await self._move("create_pending", from_user, to_user, request, request.timeout_seconds)
        return pb.CreatePendingTransferResponse(
            pending_transfer=pending_transfer_message(payer["pending"]),
            from_balance=balance_after(payer), to_balance=balance_after(payee),
        )

    async def PostPendingTransfer(
        self, request: pb.PostPendingTransferRequest, context: grpc.aio.ServicerContext
    ) -> pb.PostPendingTransferResponse:
        if request.amount < 0:
            raise InvalidArgument("amount", "must be 0 (all of it) or greater")
        payer, payee = await self._resolve("post_pending", request, request.amount)
        return pb.PostPendingTransferResponse(
            pending_transfer=pending_transfer_message(payer["pending"]),
            transactions=[transaction_message(payer), transaction_message(payee)],
            from_balance=balance_after(payer), to_balance=balance_after(payee),
        )

    async def VoidPendingTransfer(
        self, request: pb.VoidPendingTransferRequest, context: grpc.aio.ServicerContext
    ) -> pb.VoidPendingTransferResponse:
        payer, _payee = await self._resolve("void_pending", request, 0)
        return pb.VoidPendingTransferResponse(
            pending_transfer=pending_transfer_message(payer["pending"]), from_balance=balance_after(payer)
        )

    async def SetAccountPolicy(
        self, request: pb.SetAccountPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAccountPolicyResponse:
        user_id = validation.user_id(request.user_id, "user_id")
        _require_service(current_principal.get(), "SetAccountPolicy")
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
