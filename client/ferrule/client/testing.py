"""An in-process Ferrule server for client users' own tests.

`FerruleTestServer` runs the real server (the same assembly production runs) in a
background thread with its own event loop, on a throwaway SQLite database and the
in-process cache: no PostgreSQL, Redis or other process needed, and the behaviour
(validation, errors, pagination, etags, idempotency) is the real one, not a fake's.

The server lives in the `ferrule-server` distribution, which this package does not
depend on: it is imported only when a test server starts (install both for tests,
e.g. `pip install ferrule-client ferrule-server`).

    with FerruleTestServer() as server:
        with server.client() as client:            # admin token
            org = client.users.CreateOrganization(...)
        with server.client(server.token_for(org_id, "read")) as reader:
            ...
"""

from __future__ import annotations

import asyncio
import importlib
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ferrule.client.aio import AsyncFerruleClient
from ferrule.client.config import ClientConfig
from ferrule.client.sync import FerruleClient

__all__ = ["FerruleTestServer"]

T = TypeVar("T")


class FerruleTestServer:
    def __init__(self, **settings: Any) -> None:
        """`settings` override server settings by field name (e.g. ferrule_slow_query_ms=5)."""
        self.admin_token = secrets.token_urlsafe(24)
        self.jwt_secret = secrets.token_urlsafe(32)
        self._overrides = settings
        self._directory: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._app: Any = None
        self.target = ""

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> FerruleTestServer:
        try:  # the one import of the server from the client package, declared in pyproject.toml
            from db.migrate import upgrade_to_head
            from server.app import FerruleApp
            from server.settings import Settings
        except ImportError as exc:
            raise RuntimeError(
                "FerruleTestServer runs the real server: install the ferrule-server "
                "distribution next to ferrule-client"
            ) from exc
        self._directory = Path(tempfile.mkdtemp(prefix="ferrule-test-"))
        url = f"sqlite+aiosqlite:///{self._directory / 'ferrule.db'}"
        values: dict[str, Any] = {
            "ferrule_listen": "127.0.0.1:0",
            "database_url": url,
            "ferrule_jwt_secret": self.jwt_secret,
            "ferrule_admin_token": self.admin_token,
            "ferrule_grace_seconds": 1.0,
        }
        values.update(self._overrides)
        settings = Settings(**values)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ferrule-test-server", daemon=True
        )
        self._thread.start()
        self._run(upgrade_to_head(url))
        self._app = FerruleApp(settings)
        port = self._run(self._app.start())
        self.target = f"127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._loop is not None:
            if self._app is not None:
                self._run(self._app.stop(grace=0.5))
                self._app = None
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def __enter__(self) -> FerruleTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- credentials and clients -------------------------------------------------
    def token_for(
        self, organization: str, scope: str = "read write", subject: str = "test", ttl: float = 3600
    ) -> str:
        """A JWT for `organization` (an id, or "*") with the given space-separated scopes."""
        jwt = importlib.import_module("jwt")  # PyJWT comes with the server distribution
        claims = {"sub": subject, "org": organization, "scope": scope, "exp": time.time() + ttl}
        token: str = jwt.encode(claims, self.jwt_secret, algorithm="HS256")
        return token

    def config(self, token: str | None = None, **options: Any) -> ClientConfig:
        return ClientConfig(target=self.target, token=token or self.admin_token, **options)

    def client(self, token: str | None = None, **options: Any) -> FerruleClient:
        """A blocking client (admin token unless `token` is given)."""
        return FerruleClient(config=self.config(token, **options))

    def async_client(self, token: str | None = None, **options: Any) -> AsyncFerruleClient:
        """An asyncio client; create it inside the event loop that will use it."""
        return AsyncFerruleClient(config=self.config(token, **options))
