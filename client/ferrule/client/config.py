"""How a client connects: target, credentials, deadlines, retries and channel options.

Retries live only in the gRPC service config (AIP-194): the channel retries UNAVAILABLE
with exponential backoff, inside gRPC core, for the Ferrule services. Nothing else is
retried automatically; every other status reaches the caller as a typed exception.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.trace import TracerProvider

from ferrule import __version__

__all__ = [
    "FERRULE_SERVICES",
    "RETRIED_SERVICES",
    "ClientConfig",
    "channel_credentials",
    "channel_options",
    "resolve_config",
    "service_config",
]

FERRULE_SERVICES: tuple[str, ...] = (
    "ferrule.v1.UserService",
    "ferrule.v1.AnalysisService",
    "ferrule.v1.PredictionService",
    "ferrule.v1.HealthService",
)
"""Fully qualified names of the Ferrule gRPC services."""

RETRIED_SERVICES: tuple[str, ...] = (*FERRULE_SERVICES, "grpc.health.v1.Health")
"""Services whose calls the channel retries on UNAVAILABLE (the standard health check
is idempotent too)."""

_MAX_GRPC_ATTEMPTS = 5  # gRPC core silently caps maxAttempts at 5


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything needed to open a channel to a Ferrule server.

    ``token`` is sent as ``authorization: Bearer <token>``: as call credentials on TLS
    channels, and by an interceptor on plaintext channels (gRPC refuses call credentials
    without TLS; plaintext is for local development and tests).
    """

    target: str
    """``host:port`` (or any gRPC target URI, e.g. ``dns:///ferrule.internal:443``)."""
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    """PEM roots to verify the server with; None uses the system roots."""
    certificate_chain: bytes | None = None
    """PEM client certificate chain for mutual TLS."""
    private_key: bytes | None = None
    """PEM private key of ``certificate_chain``."""
    server_name_override: str | None = None
    """Name to verify the server certificate against instead of the target host."""
    default_timeout: float | None = 10.0
    """Deadline in seconds applied to every call made without one; None for none."""
    max_attempts: int = 4
    """Attempts per call including the first, for UNAVAILABLE only (1 disables retries;
    gRPC allows at most 5)."""
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0
    max_send_message_length: int = 32 * 1024 * 1024
    max_receive_message_length: int = 32 * 1024 * 1024
    user_agent: str = f"ferrule-client-python/{__version__}"
    retried_services: tuple[str, ...] = RETRIED_SERVICES
    options: tuple[tuple[str, Any], ...] = field(default=())
    """Extra gRPC channel arguments, appended after (and so overriding) ours."""
    tracer_provider: TracerProvider | None = None
    """Where client spans go; None uses the global provider (a no-op until one is set)."""

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target must not be empty")
        if not 1 <= self.max_attempts <= _MAX_GRPC_ATTEMPTS:
            raise ValueError(f"max_attempts must be between 1 and {_MAX_GRPC_ATTEMPTS}")
        if self.initial_backoff <= 0 or self.max_backoff <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("backoff settings must be positive")
        if self.default_timeout is not None and self.default_timeout <= 0:
            raise ValueError("default_timeout must be positive (or None)")
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("certificate_chain and private_key go together (mutual TLS)")
        uses_tls_material = (
            self.root_certificates,
            self.certificate_chain,
            self.server_name_override,
        )
        if not self.tls and any(x is not None for x in uses_tls_material):
            raise ValueError("certificates and server_name_override need tls=True")


def resolve_config(
    target: str | None, token: str | None, config: ClientConfig | None
) -> ClientConfig:
    """``config`` with ``target``/``token`` applied over it (or a plain config of them)."""
    if config is None:
        if target is None:
            raise ValueError("give a target or a config")
        return ClientConfig(target=target, token=token)
    if target is not None:
        config = dataclasses.replace(config, target=target)
    if token is not None:
        config = dataclasses.replace(config, token=token)
    return config


def _duration(seconds: float) -> str:
    """A google.protobuf.Duration in its JSON form, as service configs want it."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(config: ClientConfig) -> dict[str, Any]:
    """The gRPC service config: a retry policy for UNAVAILABLE on every retried service."""
    method_config: dict[str, Any] = {
        "name": [{"service": service} for service in config.retried_services],
    }
    if config.max_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": config.max_attempts,
            "initialBackoff": _duration(config.initial_backoff),
            "maxBackoff": _duration(config.max_backoff),
            "backoffMultiplier": config.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return {"methodConfig": [method_config]}


def channel_options(config: ClientConfig) -> list[tuple[str, Any]]:
    """Channel arguments for ``config`` (service config, limits, user agent, TLS name)."""
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(config))),
        ("grpc.max_send_message_length", config.max_send_message_length),
        ("grpc.max_receive_message_length", config.max_receive_message_length),
        ("grpc.primary_user_agent", config.user_agent),
    ]
    if config.server_name_override is not None:
        options.append(("grpc.ssl_target_name_override", config.server_name_override))
    options.extend(config.options)
    return options


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials (with the bearer token as call credentials), or None for plaintext."""
    if not config.tls:
        return None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=config.root_certificates,
        private_key=config.private_key,
        certificate_chain=config.certificate_chain,
    )
    if config.token is None:
        return credentials
    return grpc.composite_channel_credentials(
        credentials, grpc.access_token_call_credentials(config.token)
    )
