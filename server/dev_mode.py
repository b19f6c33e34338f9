"""Development mode: the first minutes on a laptop, before anyone has configured a secret.

Without a credential every data RPC answers UNAUTHENTICATED, which is right for a server
and useless to a newcomer. So `make run` asks for development mode: when the server runs
on the embedded default (SQLite, in-process cache), with no credential of any kind and a
loopback listen address, it uses a random admin token kept in a git-ignored file (the
same token on every run, so a pasted command keeps working) and prints it with a call
that creates an organization. Anything that looks like a real deployment (a secret, TLS,
another database or Redis, an address other machines can reach) switches it off: every
setting of those kinds, as the settings model declares them (server/settings.py), so that
a setting added later switches it off too.
"""

from __future__ import annotations

import os
import secrets
import shlex
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from server.settings import (
    Settings,
    credential_settings,
    is_loopback,
    listener_settings,
    upstream_settings,
)

CREDENTIALS = credential_settings()
LISTENERS = listener_settings()
UPSTREAMS = upstream_settings()


def _switches_off() -> str:
    kinds = [
        ("any credential", CREDENTIALS),
        ("a database other than SQLite, or Redis", UPSTREAMS),
        ("an address other than loopback", tuple(LISTENERS)),
    ]
    return "\n".join(
        textwrap.fill(
            f"{kind}: " + ", ".join(name.upper() for name in names),
            width=92,
            initial_indent="    ",
            subsequent_indent="      ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        for kind, names in kinds
    )


#: What ends development mode, by environment variable, one kind a line (the banner's end).
SWITCHES_OFF = _switches_off()


def _values(value: object) -> Sequence[object]:
    if value is None:
        return ()
    return value if isinstance(value, list) else (value,)


def blockers(settings: Settings) -> list[str]:
    """Why development mode does not apply (empty: it does): the environment variables."""
    found: list[str] = []
    for name in Settings.model_fields:
        values = _values(getattr(settings, name))
        listener = LISTENERS.get(name)
        if (
            (name in CREDENTIALS and values)
            or (name in UPSTREAMS and any(not str(v).startswith("sqlite") for v in values))
            or (listener and any(not is_loopback(listener.host(str(v))) for v in values))
        ):
            found.append(name.upper())
    return found


def load_or_create_token(path: Path) -> str:
    """The token in `path`, or a new one written there (owner-only) when there is none."""
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = "dev-" + secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return token


@dataclass(frozen=True)
class Banner:
    """What `make run` prints once the server listens (the port is known only then)."""

    token: str
    token_file: Path
    host: str

    def text(self, port: int) -> str:
        target = f"{self.host}:{port}"
        return "\n".join(
            [
                "ferrule: development mode (embedded SQLite, no credentials, loopback only)",
                f"  admin token (kept in {self.token_file}, reused on the next run):",
                f"    {self.token}",
                "  create an organization:",
                f"    {create_organization_command(self.token, target)}",
                "  development mode is off as soon as any of these is configured:",
                SWITCHES_OFF,
            ]
        )


def apply(settings: Settings, token_file: Path) -> tuple[Settings, Banner | None]:
    """Settings with the development admin token, and its banner, when the mode applies."""
    if blockers(settings):
        return settings, None
    token = load_or_create_token(token_file)
    host, _, _ = settings.ferrule_listen.rpartition(":")
    with_token = settings.model_copy(update={"ferrule_admin_token": SecretStr(token)})
    return with_token, Banner(token=token, token_file=token_file, host=host)


def create_organization_command(token: str, target: str) -> str:
    """A grpcurl call, ready to paste, that creates the first organization."""
    body = '{"organization": {"display_name": "My first organization"}}'
    return shlex.join(
        [
            "grpcurl",
            "-plaintext",
            "-H",
            f"authorization: Bearer {token}",
            "-d",
            body,
            target,
            "ferrule.v1.UserService/CreateOrganization",
        ]
    )
