"""Level-triggered watch streams: send the resource's state now, then again whenever a
committed change may have moved it, until it is final.

The notification (db/change_feed.py) only wakes the watcher; the state it sends is
always re-read through the tenant-scoped repositories, so a watch can see nothing its
caller could not Get. A consumer slower than the changes holds at most one unsent
state: while the stream waits for the consumer, further changes only set the
subscription's flag, and the next read sends the latest state (coalescing). A state
equal to the last one sent is not sent again.

Each watch holds a slot of :class:`server.watch_slots.WatchSlots` while it is open.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

from google.protobuf.message import Message

from server.dependencies import Dependencies

M = TypeVar("M", bound=Message)


async def watch(
    deps: Dependencies,
    organization_id: uuid.UUID,
    kinds: Iterable[str],
    resource_id: uuid.UUID | None,
    read: Callable[[], Awaitable[M]],
    is_final: Callable[[M], bool],
) -> AsyncIterator[M]:
    """Yield ``read()`` now and after every matching change until ``is_final``."""
    with (
        deps.watch_slots.slot(),
        deps.changes.subscribe(organization_id, kinds, resource_id) as sub,
    ):
        # Subscribed before the first read: a change committed in between wakes `sub`.
        last: bytes | None = None
        while True:
            state = await read()
            encoded = state.SerializeToString(deterministic=True)
            if encoded != last:
                last = encoded
                yield state
            if is_final(state):
                return
            await sub.wait()
