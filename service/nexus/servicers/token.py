"""nexus.v1.TokenService.

Credit mints tokens, so it is for services only; users move their own tokens
(Deduct, Transfer) and read their own balances and ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from nexus import queries, validation
from nexus.auth import acting_user, current_principal
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
}
MAX_REASON_CHARS = 500
MAX_REFERENCE_CHARS = 128


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
    )
    message.create_time.FromDatetime(row["create_time"])
    return message


class TokenServicer(token_pb2_grpc.TokenServiceServicer):
    def __init__(self, db: Database, page_tokens: PageTokens) -> None:
        self._db = db
        self._tokens = page_tokens
        self._ledger = GroupCommit(db, queries.APPLY_TOKEN_OPERATIONS)

    async def _apply(
        self, op: str, user_id: str, counterparty: str | None, request: Any
    ) -> list[pb.Transaction]:
        """Validates the shared fields, applies one ledger operation, returns its transactions."""
        amount = validation.amount(request.amount)
        reason = validation.text(request.reason, "reason", MAX_REASON_CHARS)
        reference_id = validation.text(request.reference_id, "reference_id", MAX_REFERENCE_CHARS)
        request_id = validation.request_id(request.request_id, required=True)
        # A transfer is routed by its payer or its payee (group_commit: a hot payee's batch goes by the payee).
        keys = (user_id,) if counterparty is None else (user_id, counterparty)
        rows = await self._ledger.submit(keys, keys, user_id, op, counterparty, amount, reason, reference_id, request_id)
        return [transaction_message(r) for r in rows]

    async def _credit_or_deduct(self, request: pb.CreditRequest | pb.DeductRequest, op: str) -> pb.Transaction:
        user_id = acting_user(request.user_id)
        if op == "credit" and not current_principal.get().is_service:
            raise PermissionDenied("Credit mints tokens and needs a service token")
        (transaction,) = await self._apply(op, user_id, None, request)
        return transaction

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
        out_leg, in_leg = await self._apply("transfer", from_user, to_user, request)
        return pb.TransferResponse(
            transactions=[out_leg, in_leg], from_balance=out_leg.balance_after, to_balance=in_leg.balance_after
        )

    async def GetBalances(self, request: pb.GetBalancesRequest, context: grpc.aio.ServicerContext) -> pb.GetBalancesResponse:
        user_ids = validation.user_ids(request.user_ids, "user_ids")
        principal = current_principal.get()
        for i, user_id in enumerate(user_ids):
            principal.require_acting_as(user_id, f"user_ids[{i}]")
        rows = await self._db.fetch(queries.GET_BALANCES, user_ids)
        response = pb.GetBalancesResponse()
        for row in rows:
            balance = response.balances.add(user_id=row["user_id"], balance=row["balance"])
            if row["update_time"] is not None:
                balance.update_time.FromDatetime(row["update_time"])
        return response

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
