"""Unit tests: the pure modules (validation, page tokens, error mapping, token
checks) without PostgreSQL or a server; ``pytest tests/unit`` takes seconds.

The database fixtures of tests/conftest.py are replaced by ones that fail, so a
test here cannot quietly start a database."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    pytest.fail("unit tests run without a database: move this test to tests/service or tests/operations")


@pytest.fixture(scope="session")
def citus_url() -> str:
    pytest.fail("unit tests run without a database: move this test to tests/service or tests/operations")
