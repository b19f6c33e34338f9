"""Stopping background tasks: a shutdown ends even when a task swallows a cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from db.background_tasks import cancel_and_wait


async def _swallows_first_cancellation(started: asyncio.Event) -> None:
    """A probe loop whose first cancellation is lost, as Python 3.11's ``wait_for``
    loses one that arrives as its awaitable completes."""
    started.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    await asyncio.sleep(3600)


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again() -> None:
    started = asyncio.Event()
    task = asyncio.create_task(_swallows_first_cancellation(started))
    await started.wait()
    assert await cancel_and_wait([task], within=30)
    assert task.cancelled()


async def test_a_task_that_never_ends_is_abandoned_after_the_bound_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    task = asyncio.create_task(stubborn(), name="stubborn-listener")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="db.background_tasks"):
        assert not await cancel_and_wait([task], within=0.2)
    assert "stubborn-listener" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait({task})


async def test_errors_of_stopped_tasks_are_retrieved_not_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("lost connection")

    failed = asyncio.create_task(fails())
    await asyncio.wait({failed})
    running = asyncio.create_task(asyncio.sleep(3600))
    assert await cancel_and_wait([failed, running], within=30)
    assert running.cancelled()
