"""A Get's cache key: reads and the invalidations of writes name the same entry."""

from __future__ import annotations

import uuid

from db.cache import CacheKey
from server.services import cached_reads as cr


def test_an_entity_key_is_the_kind_and_both_ids_as_text() -> None:
    organization, user = uuid.uuid4(), uuid.uuid4()
    assert cr.entity_key(cr.USER, organization, user) == CacheKey(
        cr.USER, str(organization), str(user)
    )


def test_a_write_invalidates_the_key_its_read_uses() -> None:
    organization, user = uuid.uuid4(), uuid.uuid4()
    stale = cr.Invalidation()
    stale.entity(cr.USER, organization, user)
    assert stale.keys == [cr.entity_key(cr.USER, organization, user)]


def test_keys_stay_right_past_the_bound_of_remembered_keys() -> None:
    organization = uuid.uuid4()
    users = [uuid.uuid4() for _ in range(cr._ENTITY_KEYS_MAX + 10)]
    for user in users:
        assert cr.entity_key(cr.USER, organization, user).ident == str(user)
    assert len(cr._entity_keys) <= cr._ENTITY_KEYS_MAX
    first = users[0]
    assert cr.entity_key(cr.ANALYSIS, organization, first) == CacheKey(
        cr.ANALYSIS, str(organization), str(first)
    )
