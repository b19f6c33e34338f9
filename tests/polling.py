"""Waiting in tests: poll a condition until it holds, within a generous deadline.

A test never sleeps a fixed time hoping that something happened meanwhile, and never
asserts how long something took: on a machine whose cores are busy with other work both
are races. The deadline only bounds a test that would otherwise hang; a condition that
holds returns at once, however slow or fast the machine is.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

#: Seconds a condition gets to hold: far beyond any healthy run, so only a bug reaches it.
DEADLINE_S = 60.0
#: Seconds between two looks at the condition.
INTERVAL_S = 0.01


async def eventually(
    condition: Callable[[], object | Awaitable[object]],
    *,
    what: str,
    within: float = DEADLINE_S,
    interval: float = INTERVAL_S,
) -> None:
    """Return once `condition()` (sync or async) is truthy; fail naming `what` if it is
    still falsy after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {within:.0f}s")
        await asyncio.sleep(interval)


def eventually_sync(
    condition: Callable[[], object],
    *,
    what: str,
    within: float = DEADLINE_S,
    interval: float = INTERVAL_S,
) -> None:
    """:func:`eventually` for code outside an event loop."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {within:.0f}s")
        time.sleep(interval)


async def finishes(awaitable: Awaitable[None], *, what: str, within: float = DEADLINE_S) -> None:
    """Await `awaitable`; if it has not finished after `within` seconds, fail naming
    `what` and print where every task of the loop is waiting (a hang becomes a report)."""
    try:
        await asyncio.wait_for(asyncio.ensure_future(awaitable), within)
    except TimeoutError:
        for task in asyncio.all_tasks():
            print(f"--- {task!r}")
            task.print_stack(limit=12)
        raise AssertionError(f"{what}: not finished within {within:.0f}s") from None
