"""The one pagination helper for List RPCs (AIP-158): page size rules and page tokens.

The data layer pages by keyset and hands back a plain cursor; this module turns it into
an opaque token signed for the caller's organization, the RPC and the query, and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from db.pagination import clamp_page_size
from server.call_context import current_call
from server.page_tokens import PageTokenCodec

if TYPE_CHECKING:
    from server.app import Dependencies


class ListRequest(Protocol):
    page_size: int
    page_token: str


@dataclass(frozen=True)
class PageRequest:
    page_size: int
    cursor: list[Any] | None
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
    return PageRequest(size, cursor, deps.page_tokens, organization, call.method, fingerprint)
