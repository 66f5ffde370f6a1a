"""Sentiment service settings: the shared service settings under the `SENTIMENT_` prefix, plus the runtime."""

from __future__ import annotations

from pydantic import Field

from mlplatform.settings import service_settings


class SentimentSettings(service_settings("SENTIMENT_", 50053, 9103, "sentiment")):  # type: ignore[misc]
    """Environment: `SENTIMENT_GRPC_PORT`, `SENTIMENT_RUNTIME`, ...; shared: `REDIS_URL`, `OTEL_...`."""

    runtime: str = Field("", pattern=r"^(|torchscript|onnx|onnx_int8)$")
    """Runtime variant to serve (torchscript, onnx, onnx_int8); empty: the model config's choice."""
