"""What the servicers are built from: one process's shared handles, assembled by the app."""

from __future__ import annotations

from dataclasses import dataclass

from db.cache import Cache
from db.change_feed import ChangeFeed
from db.engine import Database
from db.observability import QueryObservers
from server.health import HealthProbe
from server.page_tokens import PageTokenCodec
from server.request_log import RequestLogWriter
from server.settings import Settings
from server.watch_slots import WatchSlots


@dataclass
class Dependencies:
    """What the servicers are built from."""

    settings: Settings
    database: Database
    page_tokens: PageTokenCodec
    request_log: RequestLogWriter
    health: HealthProbe
    query_observers: QueryObservers
    cache: Cache
    #: Change notifications for watch streams (db/change_feed.py).
    changes: ChangeFeed
    watch_slots: WatchSlots
