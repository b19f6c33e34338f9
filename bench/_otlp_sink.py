"""A minimal OTLP/gRPC trace collector for the tracing scenario: ``python -m bench._otlp_sink``.

Accepts ``TraceService/Export`` on a free port, counts the spans per ``service.name`` and
drops them. It runs
as its own process, as a collector (or the agent on the host) does in production, so the
server pays exactly what it pays for a real collector: encoding, the gRPC call, the
batch processor's thread. Prints ``port N`` on start and ``spans SERVICE N`` per service on
SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections import Counter
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc


class Sink(ts_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    attribute.value.string_value
                    for attribute in resource_spans.resource.attributes
                    if attribute.key == "service.name"
                ),
                "unknown",
            )
            count = sum(len(scope.spans) for scope in resource_spans.scope_spans)
            with self._lock:
                self.spans[service] += count
        return ts.ExportTraceServiceResponse()


def main() -> None:
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ts_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(f"port {port}", flush=True)
    done.wait()
    server.stop(1)
    for service, count in sorted(sink.spans.items()):
        print(f"spans {service} {count}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
