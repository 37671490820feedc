"""Errors a call can end with, and the one place that maps them to gRPC.

Servicers raise these; database errors are translated by ``from_database``;
the interceptor turns any of them into a ``google.rpc.Status`` with rich details::

    NexusError                      (INTERNAL unless a subclass says otherwise)
    ├── InvalidArgument             INVALID_ARGUMENT + BadRequest(field)
    ├── NotFound                    NOT_FOUND + ResourceInfo
    ├── AlreadyExists               ALREADY_EXISTS
    ├── Unauthenticated             UNAUTHENTICATED
    ├── PermissionDenied            PERMISSION_DENIED
    ├── FailedPrecondition          FAILED_PRECONDITION + PreconditionFailure(type)
    ├── Aborted                     ABORTED (deadlock / serialization failure)
    ├── ResourceExhausted           RESOURCE_EXHAUSTED
    ├── Unavailable                 UNAVAILABLE
    └── DeadlineExceeded            DEADLINE_EXCEEDED

Custom SQLSTATEs raised by the stored functions (see db/0001_interactions.sql):
NX400 invalid argument, NX403 permission denied, NX404 not found,
NX409 already exists, NX412 failed precondition (DETAIL = precondition type).
"""

from __future__ import annotations

import logging

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

log = logging.getLogger("nexus.errors")


class NexusError(Exception):
    """An unexpected failure."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str = "") -> None:
        message = message or " ".join((self.__doc__ or "").split())
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        return []


class InvalidArgument(NexusError):
    """A request field is invalid."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.description)]
        )
        return [_pack(bad_request)]


class NotFound(NexusError):
    """The thing asked for does not exist, or the caller may not see it."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field

    def details(self) -> list[any_pb2.Any]:
        return [_pack(error_details_pb2.ResourceInfo(resource_name=self.field, description=self.message))]


class AlreadyExists(NexusError):
    """A request_id was already used with different arguments."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(NexusError):
    """The call carries no valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(NexusError):
    """The caller may not act as that user, or on that thing."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(NexusError):
    """The system is not in a state that allows the call."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, violation_type: str, message: str) -> None:
        super().__init__(message)
        self.violation_type = violation_type

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[error_details_pb2.PreconditionFailure.Violation(type=self.violation_type, description=self.message)]
        )
        return [_pack(failure)]


class Aborted(NexusError):
    """The transaction was rolled back by a conflict with another; nothing was written, retry."""

    code = grpc.StatusCode.ABORTED


class ResourceExhausted(NexusError):
    """Too many writes are queued; retry with backoff."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(NexusError):
    """The database cannot be reached; retry with backoff. A write cut off by a
    lost connection may or may not have been applied: retry it with the same
    request_id where the RPC has one."""

    code = grpc.StatusCode.UNAVAILABLE
    REFUSED = "the database refused the call (nothing was written); retry with backoff"


class DeadlineExceeded(NexusError):
    """The deadline passed before the database answered: a write may or may not
    have been applied. Retry it with the same request_id where the RPC has one."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    NOT_SENT = "the deadline passed before the call reached the database; nothing was written"
    CANCELLED = "the database cancelled the statement at the deadline; nothing was written"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


# SQLSTATE classes meaning "the database is not there right now".
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "57P", "53")


def from_raised(sqlstate: str, message: str, field: str) -> NexusError:
    """The error for one of the service's own SQLSTATEs (NX400, NX403, NX404,
    NX409), raised by a function or caught and returned by a batch function."""
    if sqlstate == "NX400":
        return InvalidArgument(field, message)
    if sqlstate == "NX403":
        return PermissionDenied(message)
    if sqlstate == "NX404":
        return NotFound(message, field)
    if sqlstate == "NX409":
        return AlreadyExists(message)
    raise ValueError(f"not one of the service's SQLSTATEs: {sqlstate}")


def from_database(exc: BaseException) -> NexusError:
    """Translates an asyncpg / connection error into a NexusError."""
    if isinstance(exc, NexusError):
        return exc
    if isinstance(exc, TimeoutError):  # stopped waiting: the outcome is unknown
        return DeadlineExceeded()
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        message = getattr(exc, "message", str(exc))
        # The request field: COLUMN, or DETAIL where COLUMN cannot travel (Citus
        # re-raises a worker's error with message, detail and hint only; db/0012).
        field = getattr(exc, "column_name", None) or getattr(exc, "detail", None) or ""
        if sqlstate in ("NX400", "NX403", "NX404", "NX409"):
            return from_raised(sqlstate, message, field)
        if sqlstate in ("40P01", "40001"):  # deadlock / serialization failure: rolled back, safe to retry
            return Aborted()
        if sqlstate == "NX412":
            return FailedPrecondition(getattr(exc, "detail", None) or "FAILED_PRECONDITION", message)
        # Below: errors the server reported, so the statement was rolled back.
        if sqlstate == "57014":  # query_canceled: statement_timeout, or the cancel sent at the deadline
            return DeadlineExceeded(DeadlineExceeded.CANCELLED)
        if sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES):
            return Unavailable(Unavailable.REFUSED)
        log.error("event=unexpected_database_error sqlstate=%s error=%r", sqlstate, exc)
        return NexusError(f"database error {sqlstate}")
    if isinstance(exc, OSError | asyncpg.ConnectionDoesNotExistError | asyncpg.InternalClientError):
        return Unavailable()  # the connection broke mid-call: the outcome is unknown
    log.error("event=unexpected_database_error error=%r", exc)
    return NexusError()


def to_status(error: NexusError) -> grpc.Status:
    """The google.rpc.Status of an error, ready for ``context.abort_with_status``."""
    from grpc_status import rpc_status

    status = status_pb2.Status(code=_CODE_NUMBERS[error.code], message=error.message, details=error.details())
    return rpc_status.to_status(status)


_CODE_NUMBERS = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}
