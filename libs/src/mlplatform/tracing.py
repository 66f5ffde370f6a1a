"""OpenTelemetry tracing: gRPC server spans, and child spans for each step of a request.

Span names under a service's server span: `features.read` (online feature store), `validate` (parse and
checks), `cache.get` / `cache.set`, `batch.queue_wait`, `model.inference` (with `model.name`,
`model.version`, `batch.size`) and `audit.write` (the write-behind flush, which may end after the response).

Spans are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise
the API stays a no-op. The server interceptor continues an incoming `traceparent`
(W3C trace context) and skips health and reflection RPCs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from opentelemetry import trace

log = logging.getLogger(__name__)

TRACER_NAME = "mlplatform"
_provider = None
_enabled = False  # spans are only built when an exporter is installed: the hot path stays cheap


def setup_tracing(service_name: str, endpoint: str | None) -> bool:
    """Install an OTLP-exporting tracer provider when `endpoint` is set. True when tracing is on."""
    global _provider, _enabled
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
    _enabled = True
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


def enabled() -> bool:
    """True once `setup_tracing` installed an exporter."""
    return _enabled


@contextlib.contextmanager
def span(name: str, **attributes: object) -> Iterator[None]:
    """A child span of the current span around a block; nothing at all when tracing is off."""
    if not _enabled:
        yield
        return
    with tracer().start_as_current_span(name, attributes=attributes):  # type: ignore[arg-type]
        yield


def annotate(**attributes: object) -> None:
    """Set attributes on the current span (e.g. the model and version a request resolved to)."""
    if _enabled:
        trace.get_current_span().set_attributes(attributes)  # type: ignore[arg-type]


def record_span(name: str, start_ns: int, end_ns: int, **attributes: object) -> None:
    """Record a finished child span of the current span with explicit times (e.g. queue wait)."""
    if not _enabled:
        return
    finished = tracer().start_span(name, start_time=start_ns, attributes=attributes)  # type: ignore[arg-type]
    finished.end(end_time=end_ns)
