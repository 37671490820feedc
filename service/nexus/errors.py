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
    ├── Unavailable                 UNAVAILABLE + ErrorInfo(NOTHING_WRITTEN | OUTCOME_UNKNOWN)
    └── DeadlineExceeded            DEADLINE_EXCEEDED + ErrorInfo(NOTHING_WRITTEN | OUTCOME_UNKNOWN)

Custom SQLSTATEs raised by the stored functions (see db/functions/common.sql):
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


class _OutcomeError(NexusError):
    """An error after which a write may or may not have been applied. The reply
    says which in an ErrorInfo (domain ``ERROR_DOMAIN``): reason
    ``NOTHING_WRITTEN`` where the call provably wrote nothing (it never reached
    the database, or PostgreSQL reported an error that rolled it back), reason
    ``OUTCOME_UNKNOWN`` where it may have committed (the connection was lost or
    the backend ended during the call, or the caller stopped waiting)."""

    UNKNOWN = ""

    def __init__(self, message: str = "", *, nothing_written: bool = False) -> None:
        super().__init__(message or self.UNKNOWN)
        self.nothing_written = nothing_written

    def details(self) -> list[any_pb2.Any]:
        reason = NOTHING_WRITTEN if self.nothing_written else OUTCOME_UNKNOWN
        return [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))]


class Unavailable(_OutcomeError):
    """The database cannot be reached; retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE
    UNKNOWN = (
        "the call lost the database before it answered: a write's outcome is unknown; "
        "retry it with the same request_id, or use the Set form"
    )

    @classmethod
    def refused(cls) -> Unavailable:
        return cls("the database refused the call (nothing was written); retry with backoff", nothing_written=True)


class DeadlineExceeded(_OutcomeError):
    """The deadline passed before the call was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    UNKNOWN = (
        "the deadline passed before the database answered: a write's outcome is unknown; "
        "retry it with the same request_id, or use the Set form"
    )

    @classmethod
    def not_sent(cls) -> DeadlineExceeded:
        return cls("the deadline passed before the call reached the database; nothing was written", nothing_written=True)

    @classmethod
    def cancelled(cls) -> DeadlineExceeded:
        return cls("the database cancelled the statement at the deadline; nothing was written", nothing_written=True)


# The ErrorInfo of UNAVAILABLE and DEADLINE_EXCEEDED: what the call wrote.
ERROR_DOMAIN = "nexus"
NOTHING_WRITTEN = "NOTHING_WRITTEN"
OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


# SQLSTATE classes meaning "the database is not there right now".
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "57P", "53")


# On Citus, the errors a worker's statement raises before its commit: data,
# constraint and conflict errors, and the service's own SQLSTATEs.
_STATEMENT_SQLSTATE_PREFIXES = ("22", "23", "40", "NX")


def _rolled_back(exc: asyncpg.PostgresError, distributed: bool) -> bool:
    """Whether PostgreSQL's report of a failed statement proves it was rolled back.

    An ERROR ends the statement before its implicit transaction commits. A FATAL
    or PANIC ends the session, and can come after the commit (a backend told to
    terminate while it sends the reply). A connection failure (class 08) or a
    terminated backend (57P01, 57P02) leaves the commit unknown. On a Citus
    cluster only the statement's own errors prove it: the coordinator can fail
    (cancelled, out of connections, a worker lost) after a worker committed a
    delegated call."""
    severity = getattr(exc, "severity_en", None) or getattr(exc, "severity", None)
    sqlstate = exc.sqlstate or ""
    if severity != "ERROR" or sqlstate.startswith("08") or sqlstate in ("57P01", "57P02"):
        return False
    return not distributed or sqlstate.startswith(_STATEMENT_SQLSTATE_PREFIXES)


def from_raised(sqlstate: str, message: str, detail: str) -> NexusError:
    """The error for one of the service's own SQLSTATEs (NX400, NX403, NX404,
    NX409, NX412), raised by a function or returned by a batch function in its
    error columns. ``detail``: the request field the error names, or for NX412
    the precondition type."""
    if sqlstate == "NX400":
        return InvalidArgument(detail, message)
    if sqlstate == "NX403":
        return PermissionDenied(message)
    if sqlstate == "NX404":
        return NotFound(message, detail)
    if sqlstate == "NX409":
        return AlreadyExists(message)
    if sqlstate == "NX412":
        return FailedPrecondition(detail or "FAILED_PRECONDITION", message)
    raise ValueError(f"not one of the service's SQLSTATEs: {sqlstate}")


def from_database(exc: BaseException, *, sent: bool, distributed: bool = False) -> NexusError:
    """Translates an asyncpg / connection error into a NexusError. ``sent``: the
    statement had been sent (before, nothing can have been written);
    ``distributed``: the database is a Citus coordinator."""
    if isinstance(exc, NexusError):
        return exc
    if isinstance(exc, TimeoutError):  # stopped waiting
        return DeadlineExceeded() if sent else DeadlineExceeded.not_sent()
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        message = getattr(exc, "message", str(exc))
        # The request field: COLUMN, or DETAIL where COLUMN cannot travel (Citus
        # re-raises a worker's error with message, detail and hint only).
        field = getattr(exc, "column_name", None) or getattr(exc, "detail", None) or ""
        if sqlstate in ("NX400", "NX403", "NX404", "NX409"):
            return from_raised(sqlstate, message, field)
        if sent and not _rolled_back(exc, distributed):
            if sqlstate == "57014":
                return DeadlineExceeded()
            # Logged: on Citus a bug (a statement Citus cannot plan) ends here too,
            # and the caller sees only an unknown outcome.
            log.warning("event=database_error_outcome_unknown sqlstate=%s error=%r", sqlstate, message)
            return Unavailable()
        # Below: errors that rolled the statement back, or came before it was sent.
        if sqlstate in ("40P01", "40001"):  # deadlock / serialization failure: safe to retry
            return Aborted()
        if sqlstate == "NX412":
            return from_raised(sqlstate, message, getattr(exc, "detail", None) or "")
        if sqlstate == "57014":  # query_canceled: statement_timeout, or the cancel sent at the deadline
            return DeadlineExceeded.cancelled()
        if sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES):
            return Unavailable.refused()
        log.error("event=unexpected_database_error sqlstate=%s error=%r", sqlstate, exc)
        return NexusError(f"database error {sqlstate}")
    if isinstance(exc, OSError | asyncpg.ConnectionDoesNotExistError | asyncpg.InternalClientError):
        # The connection broke: during the call, the outcome is unknown.
        return Unavailable() if sent else Unavailable.refused()
    log.error("event=unexpected_database_error error=%r", exc)
    return NexusError()


def status_message(error: NexusError) -> status_pb2.Status:
    """The google.rpc.Status of an error: its code, message and rich details."""
    return status_pb2.Status(code=_CODE_NUMBERS[error.code], message=error.message, details=error.details())


def to_status(error: NexusError) -> grpc.Status:
    """The google.rpc.Status of an error, ready for ``context.abort_with_status``."""
    from grpc_status import rpc_status

    return rpc_status.to_status(status_message(error))


_CODE_NUMBERS = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}
