"""Read-through caching of predictions (Get) and of their aggregates.

* A prediction is immutable and leaves only through the retention purge, so Get is
  cached under the organization's prediction *generation*, which a purge bumps: a purged
  row is never served from the cache afterwards.
* The aggregates are documented as "cached for a few seconds": they are keyed by a
  digest of the filter with a short TTL and no invalidation, because invalidating on
  every ingested row would turn a stream of thousands of rows a second into as many
  cache writes.

Works without a cache: when the dependencies carry none (``deps.cache`` absent or
None), every call goes straight to the loader.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import Message

from db.cache import Cache, CacheKey

if TYPE_CHECKING:
    from server.app import Dependencies

M = TypeVar("M", bound=Message)

#: "A few seconds" (the contract) even if the configured statistics TTL is longer.
AGGREGATE_TTL_SECONDS = 5.0


def cache_of(deps: Dependencies) -> Cache | None:
    cache = getattr(deps, "cache", None)
    return cache if isinstance(cache, Cache) else None


def generation_tenant(organization_id: uuid.UUID) -> str:
    """The generation counter of one organization's predictions (not its users etc.)."""
    return f"predictions.{organization_id}"


async def _through(
    cache: Cache | None,
    key: CacheKey | None,
    response_type: type[M],
    load: Callable[[], Awaitable[M]],
    ttl: float,
) -> M:
    if cache is None or key is None:
        return await load()

    async def loader() -> bytes:
        return (await load()).SerializeToString()

    data = await cache.get_or_load(key, loader, ttl)
    if data is None:  # the loader always returns bytes; absence raises NotFound instead
        return await load()
    return response_type.FromString(data)


async def cached_prediction(
    deps: Dependencies,
    organization_id: uuid.UUID,
    prediction_id: uuid.UUID,
    response_type: type[M],
    load: Callable[[], Awaitable[M]],
) -> M:
    cache = cache_of(deps)
    key = None
    if cache is not None:
        key = await cache.versioned_key(
            "prediction", generation_tenant(organization_id), str(prediction_id)
        )
    return await _through(cache, key, response_type, load, deps.settings.ferrule_cache_ttl_seconds)


async def cached_aggregate(
    deps: Dependencies,
    kind: str,
    organization_id: uuid.UUID,
    query: Message,
    response_type: type[M],
    load: Callable[[], Awaitable[M]],
) -> M:
    """``kind`` names the aggregate; ``query`` (the filter) is digested into the key."""
    cache = cache_of(deps)
    key = None
    if cache is not None:
        digest = hashlib.sha256(query.SerializeToString(deterministic=True)).hexdigest()[:32]
        key = CacheKey(kind, str(organization_id), digest)
    ttl = min(AGGREGATE_TTL_SECONDS, deps.settings.ferrule_cache_stats_ttl_seconds)
    return await _through(cache, key, response_type, load, ttl)


async def forget_predictions(deps: Dependencies, organization_ids: Iterable[uuid.UUID]) -> None:
    """After a purge: make every cached prediction of these organizations unreachable."""
    cache = cache_of(deps)
    if cache is not None:
        await cache.bump(*(generation_tenant(o) for o in organization_ids))
