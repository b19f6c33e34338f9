"""Opaque page tokens (AIP-158): a keyset cursor, signed and bound to caller and query.

The token is key id + "." + base64url(JSON payload) + "." + HMAC-SHA256 over both, keyed by
a server secret. The payload names the organization, the RPC and a fingerprint of the
query's filters and ordering, so a token cannot be forged, nor replayed against another
query or tenant. The key id (a digest of the key, never the key) says which secret signed
it, so the secret can be rotated: new tokens are signed with the current key while tokens
signed with a previous one (FERRULE_PAGE_TOKEN_PREVIOUS_SECRETS) are still accepted.
This is a dozen lines over the standard library's `hmac`; a JWT would work too but
spends half of every token on a header we do not need.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from db.errors import FieldViolation, ValidationError

_FIELD = "page_token"


def key_id(secret: bytes) -> str:
    """A short public name for a key: which key signed a token, revealing nothing of it."""
    digest = hashlib.sha256(b"ferrule-page-token-key-id|" + secret).digest()
    return base64.urlsafe_b64encode(digest[:6]).decode()


class PageTokenCodec:
    def __init__(self, secret: bytes, previous: tuple[bytes, ...] = ()) -> None:
        for key in (secret, *previous):
            if len(key) < 16:
                raise ValueError("page token secrets must be at least 16 bytes")
        self._secret = secret
        self._key_id = key_id(secret)
        self._keys = {key_id(key): key for key in (*previous, secret)}

    @staticmethod
    def fingerprint(*parts: object) -> str:
        """Digest of everything that defines the query besides the cursor."""
        text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @staticmethod
    def _sign(key: bytes, signed: bytes) -> bytes:
        return hmac.new(key, signed, hashlib.sha256).digest()

    def encode(self, cursor: list[Any], *, organization: str, method: str, query: str) -> str:
        payload = json.dumps(
            {"c": cursor, "o": organization, "m": method, "q": query},
            separators=(",", ":"),
            default=str,
        ).encode()
        signed = self._key_id.encode() + b"." + base64.urlsafe_b64encode(payload).rstrip(b"=")
        sig = base64.urlsafe_b64encode(self._sign(self._secret, signed)).rstrip(b"=")
        return (signed + b"." + sig).decode()

    def decode(
        self, token: str, *, organization: str, method: str, query: str, field: str = _FIELD
    ) -> list[Any]:
        """The cursor inside `token`; INVALID_ARGUMENT (on ``field``) if forged, altered
        or misapplied."""
        try:
            return self._decode(token, organization=organization, method=method, query=query)
        except ValidationError as exc:
            if field == _FIELD:
                raise
            raise ValidationError(
                [FieldViolation(field, v.description) for v in exc.violations]
            ) from None

    def _decode(self, token: str, *, organization: str, method: str, query: str) -> list[Any]:
        try:
            signed, _, sig = token.encode("ascii").rpartition(b".")
            kid, _, body = signed.partition(b".")
            payload = base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))
            signature = base64.urlsafe_b64decode(sig + b"=" * (-len(sig) % 4))
        except (ValueError, UnicodeError):
            raise _invalid("is not a token this server issued") from None
        key = self._keys.get(kid.decode())
        if key is None:
            raise _invalid("was not signed by a key this server accepts (expired or foreign)")
        if not hmac.compare_digest(signature, self._sign(key, signed)):
            raise _invalid("is not a token this server issued")
        try:
            data = json.loads(payload)
        except ValueError:
            raise _invalid("is malformed") from None
        if not isinstance(data, dict):
            raise _invalid("is malformed")
        if data.get("o") != organization or data.get("m") != method:
            raise _invalid("was issued for another caller or RPC")
        if data.get("q") != query:
            raise _invalid("was issued for a different query; keep the filters and order_by")
        cursor = data.get("c")
        if not isinstance(cursor, list):
            raise _invalid("is malformed")
        return cursor


def _invalid(description: str) -> ValidationError:
    return ValidationError(violations=[FieldViolation(_FIELD, description)])
