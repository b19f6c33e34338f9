"""Cache key layout: every key is namespaced by a prefix, a kind and a tenant.

Rendered form::

    {prefix}:{kind}:{tenant}:{ident}                plain entity keys (Get by name)
    {prefix}:{kind}:{tenant}:g{generation}:{ident}  generation-scoped keys (statistics, lists)
    {prefix}:lease:{kind}:{tenant}:...              the fill lease of an entry
    {prefix}:gen:{tenant_key}                       a tenant's generation counter
    {prefix}:inv:...                                an entry's invalidation marker (Redis
                                                    broadcasts it to the near caches)

``kind`` and ``tenant`` may not contain ``:`` and ``ident`` comes last, so two different
keys never render to the same string, and the reserved kinds keep leases and counters
out of the data key space.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A generation that could not be read (cache unreachable): such keys are never cached.
UNKNOWN_GENERATION = -1

_RESERVED_KINDS = frozenset({"lease", "gen", "inv"})


def _check_segment(what: str, value: str) -> None:
    if not value or ":" in value:
        raise ValueError(f"cache key {what} must be non-empty and contain no ':': {value!r}")


@dataclass(frozen=True, slots=True)
class CacheKey:
    """One cached value: ``kind`` (e.g. ``user``), ``tenant`` (organization id),
    ``ident`` (resource name or a digest of the query), and for statistics and lists
    the tenant's ``generation`` at read time, so a bump makes old entries unreachable."""

    kind: str
    tenant: str
    ident: str
    generation: int | None = None

    def __post_init__(self) -> None:
        _check_segment("kind", self.kind)
        _check_segment("tenant", self.tenant)
        if self.kind in _RESERVED_KINDS:
            raise ValueError(f"cache key kind {self.kind!r} is reserved")

    @property
    def cacheable(self) -> bool:
        """False when the generation is unknown: such a key could collide with an entry
        written under another unknown read, so the value is loaded and never stored."""
        return self.generation is None or self.generation >= 0

    def _body(self) -> str:
        if self.generation is None:
            return f"{self.kind}:{self.tenant}:{self.ident}"
        return f"{self.kind}:{self.tenant}:g{self.generation}:{self.ident}"

    def render(self, prefix: str) -> str:
        return f"{prefix}:{self._body()}"

    def render_lease(self, prefix: str) -> str:
        return f"{prefix}:lease:{self._body()}"


def generation_key(prefix: str, tenant_key: str) -> str:
    """The counter behind :meth:`Cache.generation` for one tenant (or tenant scope)."""
    if not tenant_key:
        raise ValueError("generation tenant key must be non-empty")
    return f"{prefix}:gen:{tenant_key}"
