"""Bearer-token authentication and the "users act only as themselves" rule.

Tokens are JWTs in ``authorization: Bearer <token>`` metadata: HS256 with the
configured secret, and RS256 when a public key file is configured. Claim
``sub`` is the acting user; ``role: "service"`` marks an internal service that
may act for any user. Every token must carry ``exp``.
"""

from __future__ import annotations

import contextvars
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


@dataclass(frozen=True)
class Principal:
    subject: str
    is_service: bool

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

    def __init__(self, hs256_secret: str, rs256_public_key: str | None = None) -> None:
        self._keys: list[tuple[str, str]] = [("HS256", hs256_secret)] if hs256_secret else []
        if rs256_public_key:
            self._keys.append(("RS256", rs256_public_key))
        if not self._keys:
            raise ValueError("no token key configured: set NEXUS_JWT_SECRET or NEXUS_JWT_PUBLIC_KEY_FILE")
        self._cache: dict[str, tuple[Principal, float]] = {}

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise errors.Unauthenticated("missing authorization metadata (expected 'Bearer <token>')")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("authorization metadata must be 'Bearer <token>'")
        cached = self._cache.get(token)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        principal, expires = self._verify(token.strip())
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (principal, expires)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise errors.Unauthenticated(f"malformed token: {exc}") from exc
        key = next((k for alg, k in self._keys if alg == algorithm), None)
        if key is None:
            raise errors.Unauthenticated(f"token algorithm {algorithm!r} is not accepted")
        try:
            claims = jwt.decode(token, key, algorithms=[algorithm], options={"require": ["sub", "exp"]})
        except jwt.ExpiredSignatureError as exc:
            raise errors.Unauthenticated("token expired") from exc
        except jwt.PyJWTError as exc:
            raise errors.Unauthenticated(f"invalid token: {exc}") from exc
        subject = claims["sub"]
        if not isinstance(subject, str) or not USER_ID_PATTERN.fullmatch(subject):
            raise errors.Unauthenticated("token sub must be 1-128 chars of [A-Za-z0-9_.:@-]")
        return Principal(subject, claims.get("role") == SERVICE_ROLE), float(claims["exp"])


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
