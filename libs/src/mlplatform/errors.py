"""Serving errors that carry the gRPC status they map to.

Model code raises these; servicers turn them into a status with `abort_on_serving_error`, which
also sends a refusal's `retry-after` hint as trailing metadata (the gateway turns it into HTTP's
`Retry-After` header).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc


class ServingError(Exception):
    """An error with a gRPC status code and a message meant for the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None, *,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        """Seconds the client should wait before retrying (the `retry-after` trailer); None: no hint."""
        if code is not None:
            self.code = code


class InvalidInputError(ServingError):
    """The request is malformed: names the offending field or index."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ServingError):
    """Unknown model or version."""

    code = grpc.StatusCode.NOT_FOUND


class QueueFullError(ServingError):
    """The batcher's queue is at its bound: the client should back off."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OverloadedError(QueueFullError):
    """Admission control: the request cannot be served within its deadline or the model's latency budget."""


class DeadlineExpiredError(ServingError):
    """The request's deadline passed while it waited in the queue."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelNotReadyError(ServingError):
    """The model is not loaded and warmed up (yet, or any more)."""

    code = grpc.StatusCode.UNAVAILABLE


class InferenceError(ServingError):
    """The runtime failed on this input."""

    code = grpc.StatusCode.INTERNAL


class ModelFailedError(ServingError):
    """The model's runtime failed while serving this request and the model has no fallback.

    UNAVAILABLE, not INTERNAL: the request was not served, and it may be retried, on another replica (the
    gateway does so at once) or later, once the model's breaker has probed it healthy again. A client can tell
    this refusal from a bug in the service.
    """

    code = grpc.StatusCode.UNAVAILABLE


RETRY_AFTER = "retry-after"
"""Trailing metadata key of a refusal's retry hint, in whole seconds (HTTP `Retry-After` semantics)."""

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def abort_on_serving_error(method: Handler) -> Handler:
    """Decorate a unary servicer method: a ServingError aborts the RPC with its status and message."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ServingError as err:
            if err.retry_after_s is not None:
                context.set_trailing_metadata(((RETRY_AFTER, str(err.retry_after_s)),))
            await context.abort(err.code, err.message)

    return wrapper  # type: ignore[return-value]
