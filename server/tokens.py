"""`ferrule-server token`: mint a JWT from the configured secret, for scripts and tests.

The token carries exactly the claims the server's Authenticator requires (`sub`, `org`,
`scope`, `exp`) plus `iat`, and `iss`/`aud` when the server checks them, so anything this
prints is accepted by a server configured with the same environment.
"""

from __future__ import annotations

import re
import time

import jwt

from server.auth import SCOPES
from server.settings import Settings

_TTL = re.compile(r"^(?P<amount>\d+)(?P<unit>[smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class TokenError(ValueError):
    """The request cannot produce a token the server would accept."""


def parse_ttl(text: str) -> int:
    """`90`, `90s`, `15m`, `1h`, `7d` -> seconds."""
    match = _TTL.match(text.strip())
    if match is None or int(match["amount"]) == 0:
        raise TokenError(f"--ttl must be a positive duration like 90s, 15m, 1h or 7d, not {text!r}")
    return int(match["amount"]) * _UNIT_SECONDS[match["unit"]]


def mint_token(
    settings: Settings,
    *,
    organization: str,
    scope: str,
    ttl_seconds: int,
    subject: str,
    now: float | None = None,
) -> str:
    if settings.ferrule_jwt_secret is None:
        raise TokenError(
            "FERRULE_JWT_SECRET is not set: tokens are signed with the server's HS256 secret "
            "(RS256/ES256 tokens come from the issuer that holds the private key)"
        )
    if "HS256" not in settings.ferrule_jwt_algorithms:
        raise TokenError("FERRULE_JWT_ALGORITHMS does not accept HS256")
    scopes = scope.split()
    if not scopes or not set(scopes) <= SCOPES:
        raise TokenError(f"--scope must be space-separated words from {sorted(SCOPES)}")
    if not organization or not subject:
        raise TokenError("--org and --subject must not be empty")
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {
        "sub": subject,
        "org": organization,
        "scope": " ".join(scopes),
        "iat": issued,
        "exp": issued + ttl_seconds,
    }
    if settings.ferrule_jwt_issuer is not None:
        claims["iss"] = settings.ferrule_jwt_issuer
    if settings.ferrule_jwt_audience is not None:
        claims["aud"] = settings.ferrule_jwt_audience
    return jwt.encode(claims, settings.ferrule_jwt_secret.get_secret_value(), algorithm="HS256")
