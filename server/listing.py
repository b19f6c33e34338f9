"""The one pagination helper for List RPCs (AIP-158): page size rules, page tokens, and
the byte budget that every List page and every ExportPredictions chunk is filled to.

The data layer pages by keyset and hands back a plain cursor; this module turns it into
an opaque token signed for the caller's organization, the RPC and the query, and back.

A page is bounded by bytes as well as rows: rows are converted one at a time and the
response stops filling before it would outgrow the budget, so a page of large rows comes
back with fewer of them and a token that continues exactly after the last one sent. The
budget is half the message limit, which leaves the rest of the message (token, totals)
room, and lets one row that alone exceeds the budget still go, alone, when it fits the
limit: every row can be read, and no response reaches the size gRPC refuses to send.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import Message

from db.pagination import Page, clamp_page_size
from server.call_context import current_call
from server.dependencies import Dependencies
from server.page_tokens import PageTokenCodec

T = TypeVar("T")
M = TypeVar("M", bound=Message)


class ListRequest(Protocol):
    page_size: int
    page_token: str


def response_byte_budget(max_message_bytes: int) -> int:
    """Bytes of rows one List page or Export chunk is filled to (see the module docstring)."""
    return max_message_bytes // 2


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def element_size(message: Message) -> int:
    """What ``message`` adds to a response as one element of a repeated field: its bytes,
    their length prefix and the field's tag (two bytes covers fields up to 2047)."""
    size = message.ByteSize()
    return 2 + _varint_size(size) + size


def fill_within(rows: Iterable[T], convert: Callable[[T], M], budget: int) -> Iterator[list[M]]:
    """``rows`` converted, in order, in groups whose elements add up to at most ``budget``
    bytes; a row larger than the budget is a group of its own. Lazy: a caller that takes
    only the first group converts at most one row more than it sends."""
    group: list[M] = []
    used = 0
    for row in rows:
        message = convert(row)
        size = element_size(message)
        if group and used + size > budget:
            yield group
            group, used = [], 0
        group.append(message)
        used += size
    if group:
        yield group


@dataclass(frozen=True)
class FilledPage(Generic[M]):
    """The rows a List response carries, and the token that continues after them."""

    items: list[M]
    next_page_token: str


@dataclass(frozen=True)
class PageRequest:
    page_size: int
    cursor: list[Any] | None
    #: Bytes of rows the response may carry (:func:`response_byte_budget`).
    byte_budget: int
    _codec: PageTokenCodec
    _organization: str
    _method: str
    _query: str

    def next_page_token(self, next_cursor: list[Any] | None) -> str:
        if next_cursor is None:
            return ""
        return self._codec.encode(
            next_cursor, organization=self._organization, method=self._method, query=self._query
        )

    def fill(self, page: Page[T], convert: Callable[[T], M]) -> FilledPage[M]:
        """The response's rows: ``page`` converted until the byte budget is reached; the
        token continues after the last row sent (the next row is the next page's first)."""
        items = next(fill_within(page.items, convert, self.byte_budget), [])
        cursor = page.cursor_after(len(items)) if items else page.next_cursor
        return FilledPage(items, self.next_page_token(cursor))


def page_request(deps: Dependencies, request: ListRequest, *query: object) -> PageRequest:
    """Validate paging fields; `query` is everything that defines the result set."""
    call = current_call()
    organization = call.organization_id or (call.principal.organization if call.principal else "")
    fingerprint = PageTokenCodec.fingerprint(*query)
    size = clamp_page_size(request.page_size)
    cursor = None
    if request.page_token:
        cursor = deps.page_tokens.decode(
            request.page_token, organization=organization, method=call.method, query=fingerprint
        )
    return PageRequest(
        size,
        cursor,
        response_byte_budget(deps.settings.ferrule_max_message_bytes),
        deps.page_tokens,
        organization,
        call.method,
        fingerprint,
    )
