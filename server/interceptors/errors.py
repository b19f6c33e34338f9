"""Maps every exception escaping a handler to a status with rich details (server/errors.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from server.errors import abort
from server.interceptors.scoped import Context, ScopedInterceptor


class ErrorMappingInterceptor(ScopedInterceptor):
    @asynccontextmanager
    async def scope(self, method: str, context: Context, request: object) -> AsyncIterator[None]:
        try:
            yield
        except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
            raise  # already a status, or the caller went away: nothing to map
        except Exception as exc:  # the mapper decides what is safe to say
            await abort(context, exc)
