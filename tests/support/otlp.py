"""A real OTLP/gRPC trace collector on loopback, in the test process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span

Received = list[tuple[str, Span]]  # (the exporter's resource service.name, span)


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """Receives OTLP trace exports on a free loopback port and keeps every span with its service name."""

    def __init__(self) -> None:
        self.spans: Received = []
        self.lock = threading.Lock()
        self.port = 0
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        """The value for OTEL_EXPORTER_OTLP_ENDPOINT (or the gateway's tracing.otlp_endpoint)."""
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    self.spans += [(service, s) for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> OtlpCollector:
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)
            self._server = None

    def received(self) -> Received:
        """A copy of what has been received so far."""
        with self.lock:
            return list(self.spans)

    def wait_for(self, done: Callable[[Received], bool], timeout: float) -> Received:
        """Poll until `done(received)` holds or `timeout` seconds pass; returns what was received (the
        caller asserts on it, so a timeout fails with the spans that did arrive)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.received()
            if done(spans) or time.monotonic() >= deadline:
                return spans
            time.sleep(0.05)
