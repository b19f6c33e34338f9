"""The hand-written layer of the Ferrule client over the generated ``ferrule.v1`` stubs.

``FerruleClient`` (blocking) and ``AsyncFerruleClient`` (asyncio) open a configured
channel and expose ``.users``, ``.analyses``, ``.predictions`` and ``.health`` stubs.
"""

from ferrule.client.aio import AsyncFerruleClient
from ferrule.client.channel import create_aio_channel, create_channel
from ferrule.client.config import FERRULE_SERVICES, ClientConfig
from ferrule.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FerruleError,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    from_rpc_error,
)
from ferrule.client.pagination import aiterate_items, aiterate_pages, iterate_items, iterate_pages
from ferrule.client.sync import FerruleClient
from ferrule.client.watch import (
    awatch_analysis,
    awatch_batch,
    awatch_predictions,
    watch_analysis,
    watch_batch,
    watch_predictions,
)

__all__ = [
    "FERRULE_SERVICES",
    "Aborted",
    "AlreadyExists",
    "AsyncFerruleClient",
    "Cancelled",
    "ClientConfig",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FerruleClient",
    "FerruleError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "aiterate_items",
    "aiterate_pages",
    "awatch_analysis",
    "awatch_batch",
    "awatch_predictions",
    "create_aio_channel",
    "create_channel",
    "from_rpc_error",
    "iterate_items",
    "iterate_pages",
    "watch_analysis",
    "watch_batch",
    "watch_predictions",
]
