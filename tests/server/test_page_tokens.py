"""Page tokens are opaque, signed, and bound to the caller's organization, RPC and query."""

from __future__ import annotations

import base64
import json

import pytest

from db.errors import ValidationError
from db.pagination import MAX_PAGE_SIZE, clamp_page_size
from server.app import page_token_codec
from server.page_tokens import PageTokenCodec, key_id
from server.settings import Settings

CODEC = PageTokenCodec(b"k" * 32)
BOUND = {"organization": "org-a", "method": "/ferrule.v1.UserService/ListUsers", "query": "q1"}


def test_round_trip_returns_the_cursor() -> None:
    token = CODEC.encode(["2026-01-01T00:00:00+00:00", "id-1"], **BOUND)
    assert CODEC.decode(token, **BOUND) == ["2026-01-01T00:00:00+00:00", "id-1"]


def test_token_is_not_readable_base64_json_alone() -> None:
    token = CODEC.encode(["x"], **BOUND)
    kid, body, signature = token.split(".")
    assert kid == key_id(b"k" * 32)
    # The body is readable (opaque is not secret) but cannot be changed without the key:
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["c"] = ["y"]
    forged_body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    with pytest.raises(ValidationError) as info:
        CODEC.decode(f"{kid}.{forged_body}.{signature}", **BOUND)
    assert info.value.violations[0].field == "page_token"


def test_the_secret_rotates_with_the_previous_key_still_accepted() -> None:
    """FERRULE_PAGE_TOKEN_SECRET rotation: tokens issued before it keep working while
    the old key is listed in FERRULE_PAGE_TOKEN_PREVIOUS_SECRETS, and not after."""
    old_key, new_key = b"old-key-" * 4, b"new-key-" * 4
    before = PageTokenCodec(old_key).encode(["cursor-1"], **BOUND)
    rotated = PageTokenCodec(new_key, previous=(old_key,))
    assert rotated.decode(before, **BOUND) == ["cursor-1"]
    after = rotated.encode(["cursor-2"], **BOUND)
    assert after.split(".")[0] == key_id(new_key) != before.split(".")[0]
    assert rotated.decode(after, **BOUND) == ["cursor-2"]
    # The old key cannot decode what the new one signed, and once it is dropped from
    # the previous keys its tokens are refused with a clear reason.
    with pytest.raises(ValidationError):
        PageTokenCodec(old_key).decode(after, **BOUND)
    with pytest.raises(ValidationError) as dropped:
        PageTokenCodec(new_key).decode(before, **BOUND)
    assert "key" in dropped.value.violations[0].description
    # A token naming the new key's id but signed with the old key is a forgery.
    _, body, signature = before.split(".")
    with pytest.raises(ValidationError):
        rotated.decode(f"{key_id(new_key)}.{body}.{signature}", **BOUND)


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


def test_rotation_is_configured_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    old, older = "o" * 24, "p" * 24
    monkeypatch.setenv("FERRULE_PAGE_TOKEN_SECRET", old)
    before = page_token_codec(Settings()).encode(["c"], **BOUND)
    monkeypatch.setenv("FERRULE_PAGE_TOKEN_SECRET", "n" * 24)
    monkeypatch.setenv("FERRULE_PAGE_TOKEN_PREVIOUS_SECRETS", f"{older}, {old}")
    assert page_token_codec(Settings()).decode(before, **BOUND) == ["c"]
    monkeypatch.setenv("FERRULE_PAGE_TOKEN_PREVIOUS_SECRETS", older)
    with pytest.raises(ValidationError):
        page_token_codec(Settings()).decode(before, **BOUND)
