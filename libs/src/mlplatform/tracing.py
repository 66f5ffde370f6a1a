"""OpenTelemetry tracing: gRPC server spans, and spans for queue wait, inference and cache calls.

Spans are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise
the API stays a no-op. The server interceptor continues an incoming `traceparent`
(W3C trace context) and skips health and reflection RPCs.
"""

from __future__ import annotations

import logging

from opentelemetry import trace

log = logging.getLogger(__name__)

TRACER_NAME = "mlplatform"
_provider = None


def setup_tracing(service_name: str, endpoint: str | None) -> bool:
    """Install an OTLP-exporting tracer provider when `endpoint` is set. True when tracing is on."""
    global _provider
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    insecure = not endpoint.startswith("https://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing: exporting spans over OTLP to %s", endpoint)
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporter (at server shutdown)."""
    if _provider is not None:
        _provider.shutdown()


def tracer() -> trace.Tracer:
    """The platform's tracer (a no-op one when tracing is off)."""
    return trace.get_tracer(TRACER_NAME)


def server_interceptor():
    """OpenTelemetry's grpc.aio server interceptor, skipping health and reflection RPCs."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    skip = filters.any_of(
        filters.health_check(),
        filters.service_prefix("grpc.reflection."),
    )
    return aio_server_interceptor(filter_=filters.negate(skip))


def record_span(name: str, start_ns: int, end_ns: int, **attributes: object) -> None:
    """Record a finished child span of the current span with explicit times (e.g. queue wait)."""
    span = tracer().start_span(name, start_time=start_ns, attributes=attributes)  # type: ignore[arg-type]
    span.end(end_time=end_ns)
