"""The one place errors become gRPC statuses: the service's own SQLSTATEs, the
database's failures, and the google.rpc.Status each carries. The database
errors are asyncpg's own exception objects, built from the fields PostgreSQL
sends (no server needed)."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from nexus import errors


def postgres_error(sqlstate: str, message: str = "m", severity: str = "ERROR", **fields: str) -> asyncpg.PostgresError:
    """The exception asyncpg raises for an error message with these fields
    (S/V: severity, C: SQLSTATE, M: message, D: detail, c: column)."""
    return asyncpg.PostgresError.new({"S": severity, "V": severity, "C": sqlstate, "M": message, **fields})


def outcome(error: errors.NexusError) -> str:
    """The ErrorInfo reason of an UNAVAILABLE or DEADLINE_EXCEEDED error."""
    (detail,) = error.details()
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and info.domain == errors.ERROR_DOMAIN
    return info.reason


@pytest.mark.parametrize(
    ("sqlstate", "code"),
    [
        ("NX400", grpc.StatusCode.INVALID_ARGUMENT),
        ("NX403", grpc.StatusCode.PERMISSION_DENIED),
        ("NX404", grpc.StatusCode.NOT_FOUND),
        ("NX409", grpc.StatusCode.ALREADY_EXISTS),
        ("NX412", grpc.StatusCode.FAILED_PRECONDITION),
        ("40P01", grpc.StatusCode.ABORTED),  # deadlock: rolled back, safe to retry
        ("40001", grpc.StatusCode.ABORTED),  # serialization failure
        ("57014", grpc.StatusCode.DEADLINE_EXCEEDED),  # statement timeout / cancel at the deadline
        ("53300", grpc.StatusCode.UNAVAILABLE),  # too many connections
        ("57P03", grpc.StatusCode.UNAVAILABLE),  # cannot connect now (starting up)
        ("42P01", grpc.StatusCode.INTERNAL),  # a bug (undefined table): never mistaken for bad input
    ],
)
def test_each_statement_error_maps_to_its_code(sqlstate: str, code: grpc.StatusCode) -> None:
    assert errors.from_database(postgres_error(sqlstate), sent=True).code == code


@pytest.mark.parametrize("sqlstate", ["57014", "53300", "57P03"])
def test_an_error_that_rolled_the_statement_back_says_nothing_was_written(sqlstate: str) -> None:
    error = errors.from_database(postgres_error(sqlstate), sent=True)
    assert outcome(error) == errors.NOTHING_WRITTEN and "nothing was written" in error.message


@pytest.mark.parametrize(
    ("exc", "distributed"),
    [
        # A backend told to terminate (or left by its postmaster) can end after its commit.
        (postgres_error("57P01", "terminating connection due to administrator command", severity="FATAL"), False),
        (postgres_error("57P02", "terminating connection because of crash", severity="FATAL"), False),
        (postgres_error("XX000", "?", severity="PANIC"), False),
        (postgres_error("53300", "too many connections", severity="FATAL"), False),
        # A node's connection broke mid-call: a Citus worker may have committed.
        (postgres_error("08006", "connection to the remote node failed"), False),
        # On Citus the coordinator can fail after a worker's commit.
        (postgres_error("53300", "too many connections"), True),
        (postgres_error("XX000", "?"), True),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"), False),
        (ConnectionResetError(), False),
    ],
)
def test_a_call_cut_off_after_it_was_sent_has_an_unknown_outcome(exc: BaseException, distributed: bool) -> None:
    error = errors.from_database(exc, sent=True, distributed=distributed)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert outcome(error) == errors.OUTCOME_UNKNOWN and "nothing was written" not in error.message


def test_an_error_of_unknown_outcome_is_logged_with_its_sqlstate(caplog: pytest.LogCaptureFixture) -> None:
    """On Citus a statement Citus cannot plan (a bug) reaches the caller as an unknown
    outcome; the log says what it was."""
    exc = postgres_error("0A000", "could not create distributed plan")
    with caplog.at_level("WARNING", logger="nexus.errors"):
        error = errors.from_database(exc, sent=True, distributed=True)
    assert error.code == grpc.StatusCode.UNAVAILABLE and outcome(error) == errors.OUTCOME_UNKNOWN
    (record,) = [r for r in caplog.records if "database_error_outcome_unknown" in r.getMessage()]
    assert "sqlstate=0A000" in record.getMessage() and "could not create distributed plan" in record.getMessage()


def test_a_cancel_on_citus_is_a_deadline_with_an_unknown_outcome() -> None:
    error = errors.from_database(postgres_error("57014", "canceling statement"), sent=True, distributed=True)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED and outcome(error) == errors.OUTCOME_UNKNOWN


@pytest.mark.parametrize("sqlstate", ["NX400", "NX412", "23505", "22003", "40P01"])
def test_a_statement_error_on_citus_still_proves_the_rollback(sqlstate: str) -> None:
    error = errors.from_database(postgres_error(sqlstate), sent=True, distributed=True)
    assert error.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize(
    "exc",
    [
        postgres_error("57P03", "the database system is starting up", severity="FATAL"),
        postgres_error("08006", "connection refused"),
        ConnectionRefusedError(),
        TimeoutError(),
    ],
)
def test_a_call_that_failed_before_it_was_sent_wrote_nothing(exc: BaseException) -> None:
    error = errors.from_database(exc, sent=False)
    assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert outcome(error) == errors.NOTHING_WRITTEN and "nothing was written" in error.message


def test_the_services_own_errors_keep_their_message_and_field() -> None:
    invalid = errors.from_database(postgres_error("NX400", "too long", c="content"), sent=True)
    assert isinstance(invalid, errors.InvalidArgument)
    assert (invalid.field, invalid.description) == ("content", "too long")
    refused = errors.from_database(postgres_error("NX412", "balance too low", D="INSUFFICIENT_FUNDS"), sent=True)
    assert isinstance(refused, errors.FailedPrecondition)
    assert refused.violation_type == "INSUFFICIENT_FUNDS"


def test_an_unexpected_database_error_says_only_its_sqlstate() -> None:
    error = errors.from_database(postgres_error("42P01", 'relation "secret_table" does not exist'), sent=True)
    assert error.message == "database error 42P01"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (ConnectionResetError(), grpc.StatusCode.UNAVAILABLE),
        (asyncpg.ConnectionDoesNotExistError("closed"), grpc.StatusCode.UNAVAILABLE),
        (asyncpg.InterfaceError("the server expects 2 arguments"), grpc.StatusCode.INTERNAL),  # a bug
        (RuntimeError("?"), grpc.StatusCode.INTERNAL),
    ],
)
def test_client_side_failures_map_to_their_codes(exc: BaseException, code: grpc.StatusCode) -> None:
    assert errors.from_database(exc, sent=True).code == code


def test_a_nexus_error_passes_through_unchanged() -> None:
    error = errors.PermissionDenied("not yours")
    assert errors.from_database(error, sent=True) is error


def test_from_raised_refuses_a_sqlstate_that_is_not_the_services() -> None:
    assert isinstance(errors.from_raised("NX404", "gone", "entry_id"), errors.NotFound)
    with pytest.raises(ValueError, match="XX000"):
        errors.from_raised("XX000", "?", "")


def rich_status(error: errors.NexusError) -> status_pb2.Status:
    status = errors.to_status(error)
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    decoded = status_pb2.Status.FromString(details)
    assert (status.code, status.details) == (error.code, error.message)
    assert decoded.code == error.code.value[0] and decoded.message == error.message
    return decoded


def test_statuses_carry_the_rich_detail_of_their_error() -> None:
    bad_request = error_details_pb2.BadRequest()
    assert rich_status(errors.InvalidArgument("tags[3]", "too long")).details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [("tags[3]", "too long")]

    failure = error_details_pb2.PreconditionFailure()
    assert rich_status(errors.FailedPrecondition("INSUFFICIENT_FUNDS", "low")).details[0].Unpack(failure)
    assert [v.type for v in failure.violations] == ["INSUFFICIENT_FUNDS"]

    resource = error_details_pb2.ResourceInfo()
    assert rich_status(errors.NotFound("no such entry", "entry_id")).details[0].Unpack(resource)
    assert resource.resource_name == "entry_id"

    assert list(rich_status(errors.Aborted()).details) == []
