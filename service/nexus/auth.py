"""Bearer-token authentication and the "users act only as themselves" rule.

Tokens are JWTs in ``authorization: Bearer <token>`` metadata: HS256 with the
configured secret, and RS256 when a public key file is configured. Claim
``sub`` is the acting user; ``role: "service"`` marks an internal service that
may act for any user. Every token must carry ``exp``; ``exp``, ``iat`` and
``nbf`` must be numbers (PyJWT alone would take ``"exp": "9999999999"``).

Clocks differ between the token issuer and this server, so the time claims are
checked with a configurable leeway: a token is accepted until ``exp + leeway``,
and that instant is also when a cached verification lapses and when a stream
opened with the token ends (UNAUTHENTICATED; see the interceptor). An operator
may cap a token's lifetime (``exp - iat``), which then requires ``iat``.
"""

from __future__ import annotations

import contextvars
import math
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from nexus import errors
from nexus.validation import USER_ID_PATTERN

SERVICE_ROLE = "service"


TIME_CLAIMS = ("exp", "iat", "nbf")


@dataclass(frozen=True)
class Principal:
    subject: str
    is_service: bool
    # Unix time after which the token is no longer accepted (exp + leeway).
    expires_at: float = math.inf

    def require_acting_as(self, user_id: str, field: str) -> None:
        """A user token may only name its own subject in the acting-user field."""
        if not self.is_service and user_id != self.subject:
            raise errors.PermissionDenied(f"{field} must be the caller's own id ({self.subject})")

    @property
    def viewer(self) -> str | None:
        """Whose visibility applies when no viewer is named: none (all) for a service."""
        return None if self.is_service else self.subject


current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("current_principal")


class Authenticator:
    """Verifies tokens, caching verified ones until they expire."""

    _CACHE_LIMIT = 10_000

    def __init__(
        self,
        hs256_secret: str,
        rs256_public_key: str | None = None,
        *,
        leeway_s: float = 30.0,
        max_lifetime_s: float = 0.0,
    ) -> None:
        self._keys: list[tuple[str, str]] = [("HS256", hs256_secret)] if hs256_secret else []
        if rs256_public_key:
            self._keys.append(("RS256", rs256_public_key))
        if not self._keys:
            raise ValueError("no token key configured: set NEXUS_JWT_SECRET or NEXUS_JWT_PUBLIC_KEY_FILE")
        self._leeway_s = leeway_s
        self._max_lifetime_s = max_lifetime_s
        self._required = ["sub", "exp", "iat"] if max_lifetime_s else ["sub", "exp"]
        self._cache: dict[str, Principal] = {}

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise errors.Unauthenticated("missing authorization metadata (expected 'Bearer <token>')")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("authorization metadata must be 'Bearer <token>'")
        cached = self._cache.get(token)
        if cached is not None and cached.expires_at > time.time():
            return cached
        principal = self._verify(token.strip())
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = principal
        return principal

    def _verify(self, token: str) -> Principal:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise errors.Unauthenticated(f"malformed token: {exc}") from exc
        key = next((k for alg, k in self._keys if alg == algorithm), None)
        if key is None:
            raise errors.Unauthenticated(f"token algorithm {algorithm!r} is not accepted")
        try:
            claims = jwt.decode(
                token, key, algorithms=[algorithm], leeway=self._leeway_s, options={"require": self._required}
            )
        except jwt.ExpiredSignatureError as exc:
            raise errors.Unauthenticated("token expired") from exc
        except jwt.PyJWTError as exc:
            raise errors.Unauthenticated(f"invalid token: {exc}") from exc
        for claim in TIME_CLAIMS:
            value = claims.get(claim)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise errors.Unauthenticated(f"token {claim} must be a number (seconds since the epoch)")
        if self._max_lifetime_s and claims["exp"] - claims["iat"] > self._max_lifetime_s:
            raise errors.Unauthenticated(f"token lifetime (exp - iat) exceeds {self._max_lifetime_s:g} s")
        subject = claims["sub"]
        if not isinstance(subject, str) or not USER_ID_PATTERN.fullmatch(subject):
            raise errors.Unauthenticated("token sub must be 1-128 chars of [A-Za-z0-9_.:@-]")
        return Principal(subject, claims.get("role") == SERVICE_ROLE, float(claims["exp"]) + self._leeway_s)


def mint_token(secret: str, subject: str, *, service: bool = False, ttl_s: int = 3600) -> str:
    """An HS256 token for development, tests and tools."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": subject, "iat": now, "exp": now + ttl_s}
    if service:
        claims["role"] = SERVICE_ROLE
    return jwt.encode(claims, secret, algorithm="HS256")


def load_or_create_secret(data_dir: Path) -> str:
    """The data directory's generated HS256 secret, created on first use (mode 0600).

    Written to a private temporary file and linked into place, so processes
    starting together agree on one secret.
    """
    path = data_dir / "jwt_secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".jwt_secret.")
        try:
            os.write(fd, (secrets.token_urlsafe(48) + "\n").encode())
            os.close(fd)
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_text().strip()
