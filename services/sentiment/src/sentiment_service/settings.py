"""Sentiment service settings: the shared service settings under the `SENTIMENT_` prefix, plus the runtime."""

from __future__ import annotations

from pydantic import Field

from mlplatform.settings import service_settings


class SentimentSettings(service_settings("SENTIMENT_", 50053, 9103, "sentiment")):  # type: ignore[misc]
    """Environment: `SENTIMENT_GRPC_PORT`, `SENTIMENT_RUNTIME`, ...; shared: `REDIS_URL`, `OTEL_...`."""

    runtime: str = Field("", pattern=r"^[a-z0-9_]*$")
    """Runtime variant to serve (auto, or one of the config's variants: onnx_int8_static, onnx, torchscript, ...);
    empty: the model config's choice (auto: from the hardware and the build's measurements)."""
