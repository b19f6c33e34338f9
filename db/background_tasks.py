"""Stopping background tasks so that a shutdown always ends.

``task.cancel(); await task`` waits forever when the task swallows its cancellation, and
Python 3.11's ``asyncio.wait_for`` does exactly that when the cancellation arrives in the
instant its inner awaitable completes: it returns the result instead of raising. A probe
or listener loop then runs on, and the server's stop waits on it for good. Ferrule's loops
use ``asyncio.timeout`` instead (ruff bans ``asyncio.wait_for``), and stop their tasks
here, which cancels again while the task lives and gives up after a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between two cancellations of a task that has not ended yet.
_RECANCEL_S = 0.05
#: How long an owner's stop waits for its background tasks by default: far beyond a
#: healthy task's reaction to cancellation, short enough that a stuck one cannot hold a
#: shutdown past the orchestrator's patience.
STOP_WITHIN_S = 5.0


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], *, within: float = STOP_WITHIN_S
) -> bool:
    """Cancel ``tasks`` and wait for them to end, for at most ``within`` seconds.

    A task that survives a cancellation is cancelled again until it ends. Returns whether
    every task ended; those that did not are named in a warning and left to the loop.
    Their results and errors are retrieved and dropped: a stopping owner has no use for
    them, and asyncio would otherwise log them as never retrieved.
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_S, remaining))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
    if pending:
        log.warning(
            "background tasks still running %.1f s after cancellation: %s",
            within,
            ", ".join(sorted(task.get_name() for task in pending)),
        )
        return False
    return True
