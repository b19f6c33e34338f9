"""What every outgoing call gets: a default deadline, credentials metadata, trace headers.

Shared by the sync and asyncio interceptors so both APIs behave the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from opentelemetry.trace import Tracer

from ferrule.client.config import ClientConfig
from ferrule.client.tracing import RpcSpan, client_tracer

__all__ = ["MetadataPairs", "OutgoingPolicy"]

MetadataPairs = list[tuple[str, str | bytes]]


@dataclass(frozen=True, slots=True)
class OutgoingPolicy:
    """Deadline and metadata rules applied to each call before it leaves the client."""

    default_timeout: float | None = None
    auth_metadata: tuple[tuple[str, str], ...] = ()
    """Added unless the caller set the same keys (plaintext channels only: on TLS the
    token travels as call credentials instead)."""
    tracer: Tracer = field(default_factory=client_tracer)

    @classmethod
    def from_config(cls, config: ClientConfig) -> OutgoingPolicy:
        auth: tuple[tuple[str, str], ...] = ()
        if config.token is not None and not config.tls:
            auth = (("authorization", f"Bearer {config.token}"),)
        return cls(
            default_timeout=config.default_timeout,
            auth_metadata=auth,
            tracer=client_tracer(config.tracer_provider),
        )

    def start_span(self, method: str | bytes) -> RpcSpan:
        return RpcSpan(method, self.tracer)

    def timeout(self, timeout: float | None) -> float | None:
        """The caller's timeout, or the default when the caller gave none."""
        return self.default_timeout if timeout is None else timeout

    def metadata(
        self, existing: Iterable[tuple[str, str | bytes]] | None, span: RpcSpan
    ) -> MetadataPairs:
        """The caller's metadata plus ours; the caller's own keys win."""
        pairs: MetadataPairs = list(existing or ())
        present = {key for key, _ in pairs}
        for key, value in (*self.auth_metadata, *span.headers()):
            if key not in present:
                pairs.append((key, value))
        return pairs
