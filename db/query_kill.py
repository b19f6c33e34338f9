"""Stopping a MySQL/MariaDB statement whose caller went away.

asyncpg cancels a PostgreSQL statement itself when its task is cancelled; asyncmy only
stops reading, and the server would run the statement to the end. So a cancelled
transaction's statement is ended from a second connection with ``KILL QUERY`` (which
needs no privilege for the user's own sessions), and the first connection, which may
still have the statement's reply unread, is never used again.
"""

from __future__ import annotations

import contextlib
import logging

import asyncmy
from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)

#: Seconds to reach the server for the KILL: a cancelled RPC should not wait long on it.
KILL_CONNECT_TIMEOUT = 2


async def kill_query(engine: Engine, thread_id: int) -> None:
    """Run ``KILL QUERY thread_id`` on a fresh connection to ``engine``'s server.

    Never raises: when the server cannot be reached the statement's own
    ``max_statement_time`` still ends it.
    """
    _, options = engine.dialect.create_connect_args(engine.url)
    options = {**options, "connect_timeout": KILL_CONNECT_TIMEOUT}
    try:
        connection = await asyncmy.connect(**options)
    except (OSError, asyncmy.errors.Error) as exc:
        logger.warning("could not connect to kill a cancelled statement: %s", type(exc).__name__)
        return
    try:
        async with connection.cursor() as cursor:
            with contextlib.suppress(asyncmy.errors.Error):  # the statement already ended
                await cursor.execute(f"KILL QUERY {int(thread_id)}")
    finally:
        connection.close()
