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


def postgres_error(sqlstate: str, message: str = "m", **fields: str) -> asyncpg.PostgresError:
    """The exception asyncpg raises for an error message with these fields
    (C: SQLSTATE, M: message, D: detail, c: column)."""
    return asyncpg.PostgresError.new({"C": sqlstate, "M": message, **fields})


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
        ("08006", grpc.StatusCode.UNAVAILABLE),  # connection failure
        ("57P01", grpc.StatusCode.UNAVAILABLE),  # admin shutdown
        ("53300", grpc.StatusCode.UNAVAILABLE),  # too many connections
        ("42P01", grpc.StatusCode.INTERNAL),  # a bug (undefined table): never mistaken for bad input
    ],
)
def test_each_sqlstate_maps_to_its_code(sqlstate: str, code: grpc.StatusCode) -> None:
    assert errors.from_database(postgres_error(sqlstate)).code == code


def test_the_services_own_errors_keep_their_message_and_field() -> None:
    invalid = errors.from_database(postgres_error("NX400", "too long", c="content"))
    assert isinstance(invalid, errors.InvalidArgument)
    assert (invalid.field, invalid.description) == ("content", "too long")
    refused = errors.from_database(postgres_error("NX412", "balance too low", D="INSUFFICIENT_FUNDS"))
    assert isinstance(refused, errors.FailedPrecondition)
    assert refused.violation_type == "INSUFFICIENT_FUNDS"


def test_an_unexpected_database_error_says_only_its_sqlstate() -> None:
    error = errors.from_database(postgres_error("42P01", 'relation "secret_table" does not exist'))
    assert error.message == "database error 42P01"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (ConnectionResetError(), grpc.StatusCode.UNAVAILABLE),
        (asyncpg.ConnectionDoesNotExistError("closed"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("?"), grpc.StatusCode.INTERNAL),
    ],
)
def test_client_side_failures_map_to_their_codes(exc: BaseException, code: grpc.StatusCode) -> None:
    assert errors.from_database(exc).code == code


def test_a_nexus_error_passes_through_unchanged() -> None:
    error = errors.PermissionDenied("not yours")
    assert errors.from_database(error) is error


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
