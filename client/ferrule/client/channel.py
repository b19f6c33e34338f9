"""Channels configured from a :class:`ClientConfig`, with the client interceptor installed."""

from __future__ import annotations

import grpc
from grpc import aio

from ferrule.client.aio_interceptors import client_interceptors
from ferrule.client.config import ClientConfig, channel_credentials, channel_options
from ferrule.client.interceptors import ClientInterceptor
from ferrule.client.outgoing import OutgoingPolicy

__all__ = ["create_aio_channel", "create_channel"]


def create_channel(config: ClientConfig) -> grpc.Channel:
    """A synchronous channel: TLS or plaintext, retries, default deadline, typed errors."""
    options = channel_options(config)
    credentials = channel_credentials(config)
    if credentials is None:
        channel = grpc.insecure_channel(config.target, options=options)
    else:
        channel = grpc.secure_channel(config.target, credentials, options=options)
    return grpc.intercept_channel(channel, ClientInterceptor(OutgoingPolicy.from_config(config)))


def create_aio_channel(config: ClientConfig) -> aio.Channel:
    """An asyncio channel with the same behaviour as :func:`create_channel`."""
    options = channel_options(config)
    credentials = channel_credentials(config)
    interceptors = client_interceptors(OutgoingPolicy.from_config(config))
    if credentials is None:
        return aio.insecure_channel(config.target, options=options, interceptors=interceptors)
    return aio.secure_channel(
        config.target, credentials, options=options, interceptors=interceptors
    )
