"""Bearer-token checks alone (nexus.auth.Authenticator): which JWTs are accepted,
as whom, and that every refusal is UNAUTHENTICATED. tests/service/test_auth.py checks
the same through a server."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nexus import errors
from nexus.auth import Authenticator, Principal, mint_token

SECRET = "unit-secret-" + "y" * 32


def bearer(claims: dict[str, object], key: object = SECRET, algorithm: str = "HS256") -> str:
    return "Bearer " + jwt.encode(claims, key, algorithm=algorithm)  # type: ignore[arg-type]


def refusal(authenticator: Authenticator, authorization: str | None) -> str:
    """The message of the Unauthenticated an authorization value must get."""
    with pytest.raises(errors.Unauthenticated) as info:
        authenticator.authenticate(authorization)
    return info.value.message


def test_a_minted_token_names_its_subject_and_role() -> None:
    authenticator = Authenticator(SECRET, leeway_s=30)
    user = authenticator.authenticate("Bearer " + mint_token(SECRET, "alice", ttl_s=60))
    assert (user.subject, user.is_service, user.viewer) == ("alice", False, "alice")
    service = authenticator.authenticate("bearer " + mint_token(SECRET, "billing", service=True))
    assert (service.subject, service.is_service, service.viewer) == ("billing", True, None)
    assert time.time() + 60 < user.expires_at <= time.time() + 60 + 30 + 1  # exp + leeway


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Basic abc", "Bearer "])
def test_missing_or_non_bearer_authorization_is_refused(authorization: str | None) -> None:
    assert refusal(Authenticator(SECRET), authorization)


def test_expiry_is_checked_with_the_leeway() -> None:
    now = int(time.time())
    authenticator = Authenticator(SECRET, leeway_s=30)
    assert authenticator.authenticate(bearer({"sub": "alice", "exp": now - 10})).subject == "alice"
    assert refusal(authenticator, bearer({"sub": "alice", "exp": now - 60})) == "token expired"


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "alice"},  # no exp
        {"exp": 2**40},  # no sub
        {"sub": "alice", "exp": str(2**40)},  # exp as a string
        {"sub": "alice", "exp": 2**40, "nbf": True},
        {"sub": "al ice", "exp": 2**40},
        {"sub": 42, "exp": 2**40},
    ],
    ids=["no-exp", "no-sub", "exp-string", "nbf-bool", "sub-space", "sub-number"],
)
def test_malformed_claims_are_refused(claims: dict[str, object]) -> None:
    assert refusal(Authenticator(SECRET), bearer(claims))


def test_a_token_signed_otherwise_is_refused() -> None:
    claims = {"sub": "alice", "exp": 2**40}
    assert refusal(Authenticator(SECRET), bearer(claims, key="another-secret-" + "z" * 32))
    assert "not accepted" in refusal(Authenticator(SECRET), "Bearer " + jwt.encode(claims, None, algorithm="none"))
    assert refusal(Authenticator(SECRET), "Bearer not.a.jwt")


def test_rs256_tokens_are_accepted_with_the_public_key_only() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    claims = {"sub": "alice", "exp": 2**40}
    assert Authenticator("", public_pem).authenticate(bearer(claims, private, "RS256")).subject == "alice"
    assert "not accepted" in refusal(Authenticator("", public_pem), bearer(claims))  # HS256 without a secret


def test_a_lifetime_cap_requires_iat_and_bounds_exp_minus_iat() -> None:
    now = int(time.time())
    capped = Authenticator(SECRET, max_lifetime_s=3600)
    assert capped.authenticate(bearer({"sub": "alice", "iat": now, "exp": now + 3600})).subject == "alice"
    assert refusal(capped, bearer({"sub": "alice", "iat": now, "exp": now + 3601}))
    assert refusal(capped, bearer({"sub": "alice", "exp": now + 60}))  # no iat


def test_an_authenticator_needs_a_key() -> None:
    with pytest.raises(ValueError, match="no token key"):
        Authenticator("")


def test_users_act_only_as_themselves_and_services_as_anyone() -> None:
    Principal("alice", is_service=False).require_acting_as("alice", "user_id")
    Principal("billing", is_service=True).require_acting_as("alice", "user_id")
    with pytest.raises(errors.PermissionDenied, match="user_id"):
        Principal("alice", is_service=False).require_acting_as("bob", "user_id")
