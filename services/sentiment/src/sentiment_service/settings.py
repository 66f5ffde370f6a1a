"""Sentiment service settings: the shared service settings under the `SENTIMENT_` prefix."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from mlplatform.settings import ServiceSettings


class SentimentSettings(ServiceSettings):
    """Environment: `SENTIMENT_GRPC_PORT`, `SENTIMENT_RUNTIME`, ...; shared: `REDIS_URL`, `OTEL_...`."""

    model_config = SettingsConfigDict(
        env_prefix="SENTIMENT_", extra="ignore", validate_default=True, use_attribute_docstrings=True,
        protected_namespaces=(),
    )

    grpc_port: int = 50053
    """gRPC port of the sentiment service."""
    metrics_port: int = 9103
    """Prometheus port of the sentiment service."""
    model_name: str = "sentiment"
    """Model served."""
    runtime: str = Field("", pattern=r"^(|torchscript|onnx|onnx_int8)$")
    """Runtime variant to serve (torchscript, onnx, onnx_int8); empty: the model config's choice."""
