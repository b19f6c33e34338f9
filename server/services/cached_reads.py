"""The one way servicers use the cache: read-through Gets and statistics, and the
invalidation every write performs after its commit and before it returns.

Values are the serialized response protobufs. Every key is namespaced by the
organization (the key's tenant segment, or the generation counter it is built on), and
servicers call `authorize` *before* reaching this module, so a hit never skips the
organization check: a key of organization A is only ever read by a caller allowed A.

What is cached and how each entry is kept fresh:

==========================  ====================================  ==========================
read                        key                                   made stale by
==========================  ====================================  ==========================
GetOrganization             ``organization:{org}:{org}``          delete of that key
GetUser                     ``user:{org}:{user}``                 delete of that key
GetAnalysis                 ``analysis:{org}:{analysis}``         delete of that key
GetBatch                    ``batch`` under gen ``analyses.{org}``  analyses bump / key delete
GetPrediction               ``prediction`` under ``predictions``  purge bumps ``predictions``
GetUserStatistics           under gen ``users.{org}``             user writes bump
GetAnalysisStatistics       under gen ``analyses.{org}``          analysis writes bump
GetRiskDistribution,        under gen ``predictionstats.{org}``   every committed prediction
GetPredictionStatistics                                           write bumps (once per txn)
==========================  ====================================  ==========================

* A batch's progress is derived from its member analyses, and an analysis write can move
  rows between batches (the old batch is not known without another read) or touch many
  batches at once (BatchCreateAnalyses). So batches live under the organization's
  *analyses generation*, the same counter the analysis statistics use: every analysis
  write bumps it once, and a batch's own writes delete just its key.
* Predictions are immutable and leave only through the purge, so their Gets keep a
  generation of their own (``predictions.{org}``) that ingest never bumps; otherwise a
  stream of thousands of rows a second would keep emptying the Get cache.
* Lists, searches, LookupUserByEmail and sessions are not cached: a page depends on the
  filter, the cursor and every row around it, which the generations above would
  invalidate on nearly every write, and session state depends on the clock.
* Loaders read from the PRIMARY (`transaction(..., primary=True)`): a lagging replica's
  old row, once stored in the shared cache, would outlive the write that replaced it.
  They run in a task owned by the cache (shared by concurrent misses), so each opens its
  own transaction.
* Invalidation runs in a ``finally`` after the transaction: a write whose commit failed
  ambiguously may still have landed, and an extra invalidation only costs a reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from db.cache import UNKNOWN_GENERATION, Cache, CacheKey
from db.change_feed import Change
from db.tenancy import Tenant
from server.dependencies import Dependencies
from server.generic_handlers import serialized_reply
from server.scoping import transaction

M = TypeVar("M", bound=Message)

# Kinds (the key's first segment after the prefix).
ORGANIZATION = "organization"
USER = "user"
ANALYSIS = "analysis"
BATCH = "batch"
PREDICTION = "prediction"
USER_STATISTICS = "userstatistics"
ANALYSIS_STATISTICS = "analysisstatistics"
RISK_DISTRIBUTION = "riskdistribution"
PREDICTION_STATISTICS = "predictionstatistics"


# Generation counters, one per organization and area, so that one area's writes (a
# prediction stream) do not empty another area's statistics.
def users_generation(organization_id: uuid.UUID) -> str:
    return f"users.{organization_id}"


def analyses_generation(organization_id: uuid.UUID) -> str:
    """Analysis statistics and batches (whose progress is derived from analyses)."""
    return f"analyses.{organization_id}"


def predictions_generation(organization_id: uuid.UUID) -> str:
    """Prediction Gets; bumped only by the purge (predictions are otherwise immutable)."""
    return f"predictions.{organization_id}"


def prediction_stats_generation(organization_id: uuid.UUID) -> str:
    """Risk distribution and prediction statistics; bumped by every prediction write."""
    return f"predictionstats.{organization_id}"


def cache_of(deps: Dependencies) -> Cache | None:
    """The cache, or None when FERRULE_CACHE_ENABLED=false (every read hits the database)."""
    return deps.cache if deps.settings.ferrule_cache_enabled else None


def primary_read(deps: Dependencies, tenant: Tenant) -> AbstractAsyncContextManager[AsyncSession]:
    """The transaction a loader reads in: read-only, on the primary (never a replica)."""
    return transaction(deps, tenant, read_only=True, primary=True)


#: Plain entity keys by (kind, organization, resource), built once: a hot resource is read
#: again and again, and its key (both ids as text, the key's checks) costs more to build
#: than to look up. Bounded, emptied when full (keys are small and cheap to rebuild).
_entity_keys: dict[tuple[str, uuid.UUID, uuid.UUID], CacheKey] = {}
_ENTITY_KEYS_MAX = 10_000


def entity_key(kind: str, organization_id: uuid.UUID, resource_id: uuid.UUID) -> CacheKey:
    """The key of a plainly keyed Get (organization, user, analysis): the one its reads
    and its writes' invalidations both use."""
    parts = (kind, organization_id, resource_id)
    key = _entity_keys.get(parts)
    if key is None:
        key = CacheKey(kind, str(organization_id), str(resource_id))
        if len(_entity_keys) >= _ENTITY_KEYS_MAX:
            _entity_keys.clear()
        _entity_keys[parts] = key
    return key


def _digest(query: Message) -> str:
    return hashlib.sha256(query.SerializeToString(deterministic=True)).hexdigest()[:32]


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
    # Sent as stored, not parsed to be serialized again (server/generic_handlers.py).
    return serialized_reply(response_type, data)


# --- reads ------------------------------------------------------------------------------
async def cached_get(
    deps: Dependencies,
    kind: str,
    organization_id: uuid.UUID,
    resource_id: uuid.UUID,
    response_type: type[M],
    load: Callable[[], Awaitable[M]],
    *,
    generation: str | None = None,
) -> M:
    """Get by name. ``generation`` (a counter name) for kinds kept fresh by a bump.

    ``load`` must read on the primary (a repository's ``read_*_record`` through
    :func:`server.scoping.primary_point_reader`, or :func:`primary_read`) and raise
    NotFound for absence (absence is never cached)."""
    cache = cache_of(deps)
    key: CacheKey | None = None
    if cache is not None:
        if generation is None:
            key = entity_key(kind, organization_id, resource_id)
        else:
            key = await cache.versioned_key(kind, generation, str(resource_id))
    return await _through(cache, key, response_type, load, deps.settings.ferrule_cache_ttl_seconds)


async def cached_statistics(
    deps: Dependencies,
    kind: str,
    generation: str,
    query: Message,
    response_type: type[M],
    load: Callable[[], Awaitable[M]],
) -> M:
    """A statistics response for ``query`` (the request: its digest is the key) under the
    current value of the ``generation`` counter."""
    cache = cache_of(deps)
    key = None
    if cache is not None:
        key = await cache.versioned_key(kind, generation, _digest(query))
    ttl = deps.settings.ferrule_cache_stats_ttl_seconds
    return await _through(cache, key, response_type, load, ttl)


# --- writes -----------------------------------------------------------------------------
@dataclass
class Invalidation:
    """What one write changes, collected while it runs and applied once it ends."""

    keys: list[CacheKey] = field(default_factory=list)
    versioned: list[tuple[str, str, str]] = field(default_factory=list)
    bumps: list[str] = field(default_factory=list)
    #: For watch streams (db/change_feed.py): notified with the commit, not cache state.
    changes: list[Change] = field(default_factory=list)

    def changed(self, kind: str, organization_id: uuid.UUID, resource_id: uuid.UUID | None) -> None:
        """A watched resource changed (``resource_id`` None: some of its kind, a create)."""
        change = Change(organization_id, kind, resource_id)
        if change not in self.changes:
            self.changes.append(change)

    def entity(self, kind: str, organization_id: uuid.UUID, resource_id: uuid.UUID) -> None:
        """A plainly keyed Get (organization, user, analysis)."""
        self.keys.append(entity_key(kind, organization_id, resource_id))

    def versioned_entity(self, kind: str, generation: str, resource_id: uuid.UUID) -> None:
        """A Get keyed under ``generation`` (batch) when the generation itself need not move."""
        self.versioned.append((kind, generation, str(resource_id)))

    def bump(self, *generations: str) -> None:
        self.bumps.extend(g for g in generations if g not in self.bumps)

    async def apply(self, cache: Cache) -> None:
        keys = list(self.keys)
        bumps = list(self.bumps)
        for kind, generation, ident in self.versioned:
            if generation in bumps:
                continue  # the bump makes it unreachable already
            current = await cache.generation(generation)
            if current == UNKNOWN_GENERATION:
                # Cannot name the stale entry now: bump instead, which the cache
                # remembers and replays before it trusts the backend again.
                bumps.append(generation)
            else:
                keys.append(CacheKey(kind, generation, ident, current))
        if keys:
            await cache.invalidate(*keys)
        if bumps:
            await cache.bump(*bumps)


@asynccontextmanager
async def invalidation(deps: Dependencies) -> AsyncIterator[Invalidation]:
    """Wrap a write's transaction: what the body records is invalidated after the
    transaction ends (committed or failed) and before the RPC returns.

    The invalidation is shielded: an RPC cancelled at that moment still completes it."""
    pending = Invalidation()
    try:
        yield pending
    finally:
        cache = cache_of(deps)
        if cache is not None and (pending.keys or pending.versioned or pending.bumps):
            await asyncio.shield(pending.apply(cache))
        if pending.changes:
            await asyncio.shield(deps.changes.committed(pending.changes))


@asynccontextmanager
async def write_transaction(
    deps: Dependencies, tenant: Tenant
) -> AsyncIterator[tuple[AsyncSession, Invalidation]]:
    """One write of an RPC: its transaction, and what it makes stale, invalidated after the
    transaction ends and before the RPC answers (see :func:`invalidation`)."""
    async with invalidation(deps) as stale, transaction(deps, tenant) as session:
        yield session, stale
        await stage_changes(deps, session, stale)


async def stage_changes(deps: Dependencies, session: AsyncSession, stale: Invalidation) -> None:
    """The notifications that must travel with the commit (PostgreSQL's NOTIFY), at the end
    of a write's transaction; :func:`write_transaction` does it for its callers."""
    if stale.changes:
        await deps.changes.stage(session, stale.changes)


async def bump(deps: Dependencies, *generations: str) -> None:
    """Bump outside an `invalidation` block (after the stream's commits, the purge)."""
    cache = cache_of(deps)
    if cache is not None and generations:
        await asyncio.shield(cache.bump(*generations))


async def forget_predictions(deps: Dependencies, organization_ids: Iterable[uuid.UUID]) -> None:
    """After a purge: every cached prediction and prediction aggregate of these
    organizations becomes unreachable."""
    ids = list(organization_ids)
    await bump(
        deps,
        *(predictions_generation(o) for o in ids),
        *(prediction_stats_generation(o) for o in ids),
    )
