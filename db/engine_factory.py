"""The one place Ferrule creates SQLAlchemy engines: parameter values never leave in text.

``hide_parameters=True`` keeps bound values out of SQLAlchemy's exception messages
(``[parameters: ...]``) and its statement logging, so a failing INSERT of a user cannot
carry the email or the argon2 hash into a log line, a span's exception event or an error
detail. Every engine (the primary, replicas, the point-read pool, EXPLAIN, migrations)
is built here; a test fails when code creates one any other way.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def async_engine(url: str | URL, **options: Any) -> AsyncEngine:
    """``create_async_engine(url, **options)`` with parameters hidden from every text."""
    if make_url(url).get_backend_name() in ("mysql", "mariadb"):
        # asyncmy logs the text of every server warning, and a duplicate key's text quotes
        # the duplicate value (an email, say): values never reach the logs.
        logging.getLogger("asyncmy").setLevel(logging.ERROR)
    return create_async_engine(url, **options, hide_parameters=True)
