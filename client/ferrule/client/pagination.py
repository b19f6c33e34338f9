"""Pagers for List RPCs (AIP-158): follow ``next_page_token`` until it comes back empty.

They take the stub method and the first request, so they work for every List RPC of
every service, and for ``AnalysisService.SearchAnalyses`` (items field ``"results"``),
sync or asyncio. The request is copied, never modified in place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar

__all__ = ["aiterate_items", "aiterate_pages", "iterate_items", "iterate_pages"]


class _PageRequest(Protocol):
    page_token: str

    def CopyFrom(self, other: Any, /) -> None: ...


class _PageResponse(Protocol):
    @property
    def next_page_token(self) -> str: ...


_Req = TypeVar("_Req", bound=_PageRequest)
_Resp = TypeVar("_Resp", bound=_PageResponse)

# Stops a server that keeps returning a token from looping a client forever.
MAX_PAGES = 1_000_000


def _next_request(request: _Req, token: str) -> _Req:
    following = type(request)()
    following.CopyFrom(request)
    following.page_token = token
    return following


def iterate_pages(
    method: Callable[..., _Resp], request: _Req, **call_options: Any
) -> Iterator[_Resp]:
    """Every page of a List RPC, starting at ``request.page_token``.

    ``call_options`` (``timeout``, ``metadata``...) are passed to each call.
    """
    current = request
    for _ in range(MAX_PAGES):
        page = method(current, **call_options)
        yield page
        if not page.next_page_token:
            return
        current = _next_request(request, page.next_page_token)
    raise RuntimeError(f"more than {MAX_PAGES} pages: the server keeps returning a token")


def iterate_items(
    method: Callable[..., _Resp], request: _Req, field_name: str, **call_options: Any
) -> Iterator[Any]:
    """Every item of a List RPC: the repeated ``field_name`` of each page in turn."""
    for page in iterate_pages(method, request, **call_options):
        yield from getattr(page, field_name)


async def aiterate_pages(
    method: Callable[..., Awaitable[_Resp]], request: _Req, **call_options: Any
) -> AsyncIterator[_Resp]:
    """Every page of a List RPC on an asyncio stub, for ``async for``."""
    current = request
    for _ in range(MAX_PAGES):
        page = await method(current, **call_options)
        yield page
        if not page.next_page_token:
            return
        current = _next_request(request, page.next_page_token)
    raise RuntimeError(f"more than {MAX_PAGES} pages: the server keeps returning a token")


async def aiterate_items(
    method: Callable[..., Awaitable[_Resp]], request: _Req, field_name: str, **call_options: Any
) -> AsyncIterator[Any]:
    """Every item of a List RPC on an asyncio stub, for ``async for``."""
    async for page in aiterate_pages(method, request, **call_options):
        for item in getattr(page, field_name):
            yield item
