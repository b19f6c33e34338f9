"""Authentication: who is calling, from the `authorization: Bearer <token>` metadata.

Tokens are JWTs verified with PyJWT (HS256 with FERRULE_JWT_SECRET, RS256/ES256 with a
configured public key), or the static FERRULE_ADMIN_TOKEN for bootstrap and operations.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt

from server.input_boundary import is_organization_claim, subject_problem

ALL_ORGANIZATIONS = "*"
SCOPES = frozenset({"read", "write", "admin"})
VERIFIED_TOKENS_MAX = 10_000


class AuthenticationError(Exception):
    """The credentials are missing or invalid (UNAUTHENTICATED)."""


@dataclass(frozen=True)
class Principal:
    subject: str
    #: One organization id, or "*" for every organization.
    organization: str
    scopes: frozenset[str]

    @property
    def all_organizations(self) -> bool:
        return self.organization == ALL_ORGANIZATIONS


ADMIN_PRINCIPAL = Principal(subject="admin-token", organization=ALL_ORGANIZATIONS, scopes=SCOPES)


class Authenticator:
    def __init__(
        self,
        *,
        jwt_secret: str | None,
        jwt_public_key: str | None,
        algorithms: list[str],
        admin_token: str | None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self._secret = jwt_secret
        self._public_key = jwt_public_key
        # HMAC algorithms only with the secret, asymmetric ones only with the public key:
        # never let a public key be used as an HMAC secret (algorithm confusion).
        self._hmac_algorithms = [a for a in algorithms if a.startswith("HS")] if jwt_secret else []
        self._asym_algorithms = (
            [a for a in algorithms if not a.startswith("HS")] if jwt_public_key else []
        )
        self._admin_token = admin_token.encode() if admin_token else None
        self._audience = audience
        self._issuer = issuer
        # Services reuse one token for many calls: verifying its signature once per token
        # (not per call) saves a few percent of a point read. Bounded; entries end at `exp`.
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationError("missing authorization metadata (Bearer token)")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("authorization metadata must be 'Bearer <token>'")
        if self._admin_token is not None and hmac.compare_digest(token.encode(), self._admin_token):
            return ADMIN_PRINCIPAL
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires:
                return principal
            del self._verified[token]
        principal, expires = self._from_jwt(token)
        self._verified[token] = (principal, expires)
        if len(self._verified) > VERIFIED_TOKENS_MAX:
            self._verified.popitem(last=False)
        return principal

    def _from_jwt(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthenticationError("malformed token") from exc
        algorithm = header.get("alg")
        if algorithm in self._hmac_algorithms and self._secret is not None:
            key: str = self._secret
        elif algorithm in self._asym_algorithms and self._public_key is not None:
            key = self._public_key
        else:
            raise AuthenticationError(f"token algorithm {algorithm!r} is not accepted")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub", "org", "scope"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError("token expired") from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"invalid token: {exc}") from exc
        subject, organization, scope = claims["sub"], claims["org"], claims["scope"]
        if not all(isinstance(v, str) and v for v in (subject, organization, scope)):
            raise AuthenticationError("claims sub, org and scope must be non-empty strings")
        # The subject is recorded in audit columns and logs; the organization is parsed as a
        # UUID by every scoped call: refuse what cannot be either here, not as INTERNAL later.
        problem = subject_problem(subject)
        if problem:
            raise AuthenticationError(f"claim sub {problem}")
        if not is_organization_claim(organization, ALL_ORGANIZATIONS):
            raise AuthenticationError("claim org must be an organization id (UUID) or '*'")
        scopes = frozenset(scope.split())
        if not scopes <= SCOPES:
            raise AuthenticationError(f"unknown scopes: {sorted(scopes - SCOPES)}")
        principal = Principal(subject=subject, organization=organization, scopes=scopes)
        return principal, float(claims["exp"])
