"""Each query's name is the stored function it calls (or the table a plain read
reads): the name logs and metrics show leads a grep to the right SQL."""

from __future__ import annotations

import re

import pytest

from nexus import queries
from nexus.queries import Query

QUERIES = {name: value for name, value in vars(queries).items() if isinstance(value, Query)}


def named_after_what_it_calls(query: Query) -> bool:
    """The first function the SQL calls (an aggregate aside), or else the table it reads."""
    called = [f for f in re.findall(r"\b(\w+)\(", query.sql) if f not in ("count", "sum", "max")]
    expected = called[0] if called else re.findall(r"\bFROM (\w+)", query.sql)[0]
    return query.name == expected


@pytest.mark.parametrize("constant", sorted(QUERIES))
def test_a_query_is_named_after_the_function_it_calls(constant: str) -> None:
    query = QUERIES[constant]
    assert named_after_what_it_calls(query), f"queries.{constant} is named {query.name!r} but runs: {query.sql}"


def test_a_misnamed_query_is_found() -> None:
    assert not named_after_what_it_calls(Query("apply_reactions_v3", "SELECT * FROM apply_reactions($1)"))
    assert not named_after_what_it_calls(Query("memory_users_above", "SELECT count(*) FROM memory_users WHERE x > $1"))
    assert named_after_what_it_calls(Query("memory_users", "SELECT count(*) FROM memory_users WHERE x > $1"))
