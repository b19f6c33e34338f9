"""Page tokens are opaque, signed, and bound to the caller's organization, RPC and query."""

from __future__ import annotations

import base64
import json

import pytest

from db.errors import ValidationError
from db.pagination import MAX_PAGE_SIZE, clamp_page_size
from server.page_tokens import PageTokenCodec

CODEC = PageTokenCodec(b"k" * 32)
BOUND = {"organization": "org-a", "method": "/ferrule.v1.UserService/ListUsers", "query": "q1"}


def test_round_trip_returns_the_cursor() -> None:
    token = CODEC.encode(["2026-01-01T00:00:00+00:00", "id-1"], **BOUND)
    assert CODEC.decode(token, **BOUND) == ["2026-01-01T00:00:00+00:00", "id-1"]


def test_token_is_not_readable_base64_json_alone() -> None:
    token = CODEC.encode(["x"], **BOUND)
    assert "." in token
    body = token.split(".")[0]
    # The body is readable (opaque is not secret) but cannot be changed without the key:
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["c"] = ["y"]
    forged_body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    with pytest.raises(ValidationError) as info:
        CODEC.decode(forged_body + "." + token.split(".")[1], **BOUND)
    assert info.value.violations[0].field == "page_token"


@pytest.mark.parametrize(
    ("field", "value"),
    [("organization", "org-b"), ("method", "/ferrule.v1.UserService/SearchUsers"), ("query", "q2")],
)
def test_token_is_refused_for_another_tenant_rpc_or_query(field: str, value: str) -> None:
    token = CODEC.encode(["x"], **BOUND)
    with pytest.raises(ValidationError):
        CODEC.decode(token, **{**BOUND, field: value})


@pytest.mark.parametrize("token", ["", "garbage", "a.b", "Zm9v.YmFy", "\u00e9.\u00e9", "...."])
def test_garbage_tokens_are_invalid_argument(token: str) -> None:
    with pytest.raises(ValidationError):
        CODEC.decode(token, **BOUND)


def test_another_key_cannot_mint_tokens() -> None:
    token = PageTokenCodec(b"z" * 32).encode(["x"], **BOUND)
    with pytest.raises(ValidationError):
        CODEC.decode(token, **BOUND)


@pytest.mark.parametrize(("given", "used"), [(0, 50), (1, 1), (1000, 1000), (5000, MAX_PAGE_SIZE)])
def test_page_size_rules(given: int, used: int) -> None:
    assert clamp_page_size(given) == used


def test_negative_page_size_is_invalid() -> None:
    with pytest.raises(ValidationError) as info:
        clamp_page_size(-1)
    assert info.value.violations[0].field == "page_size"
