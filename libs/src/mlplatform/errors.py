"""Serving errors that carry the gRPC status they map to.

Model code raises these; servicers turn them into a status with `abort_with`.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """An error with a gRPC status code and a message meant for the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
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


class DeadlineExpiredError(ServingError):
    """The request's deadline passed while it waited in the queue."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelNotReadyError(ServingError):
    """The model is not loaded and warmed up (yet, or any more)."""

    code = grpc.StatusCode.UNAVAILABLE


class InferenceError(ServingError):
    """The runtime failed on this input."""

    code = grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, error: ServingError) -> None:
    """Abort the RPC with the error's status and message (raises)."""
    await context.abort(error.code, error.message)
