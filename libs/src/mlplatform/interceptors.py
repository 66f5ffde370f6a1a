"""gRPC server interceptors: request metrics for every RPC, health and reflection excepted.

Counting in an interceptor (not in each servicer) means no RPC escapes the
metrics, streaming ones included. Servicers name the model and version a request
was for with `set_request_model`; the default is the service's own model.
"""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from mlplatform import metrics

_labels: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("request_labels", default=None)

SKIPPED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def set_request_model(model: str, version: str) -> None:
    """Label the current RPC's metrics with the model and version it was served by."""
    labels = _labels.get()
    if labels is not None:
        labels["model"] = model
        labels["version"] = version


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs by model, version, method and status, and observes their latency."""

    def __init__(self, default_model: str, default_version: str) -> None:
        self.default = {"model": default_model, "version": default_version}
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(SKIPPED_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:  # wrapped once per method, not per call
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        short = method.rsplit("/", 1)[-1]
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with self._observe(short, context):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                with self._observe(short, context):
                    return await inner_su(requests, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
        inner_stream = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with self._observe(short, context):
                async for response in inner_stream(request, context):
                    yield response

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)

    def _observe(self, method: str, context: grpc.aio.ServicerContext) -> _Observation:
        return _Observation(method, dict(self.default), context)


class _Observation:
    """Context manager timing one RPC and recording its final status."""

    def __init__(self, method: str, labels: dict[str, str], context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.labels = labels
        self.context = context

    def __enter__(self) -> None:
        self.token = _labels.set(self.labels)
        self.start = time.perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        elapsed = time.perf_counter() - self.start
        _labels.reset(self.token)
        code = self.context.code()
        if isinstance(code, grpc.StatusCode):
            status = code.name
        elif exc_type is None:
            status = "OK"
        elif exc_type.__name__ in ("CancelledError",):
            status = "CANCELLED"
        else:
            status = "UNKNOWN"
        m, v = self.labels["model"], self.labels["version"]
        _requests(m, v, self.method, status).inc()
        _latency(m, v, self.method).observe(elapsed)


# Labelled children, resolved once per label set (label values are bounded: models, methods, codes).
@functools.lru_cache(maxsize=4096)
def _requests(model: str, version: str, method: str, status: str) -> Any:
    return metrics.REQUESTS.labels(model=model, version=version, method=method, status=status)


@functools.lru_cache(maxsize=4096)
def _latency(model: str, version: str, method: str) -> Any:
    return metrics.REQUEST_LATENCY.labels(model=model, version=version, method=method)
