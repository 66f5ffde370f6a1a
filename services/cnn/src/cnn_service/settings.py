"""CNN service settings: the shared service settings under the `CNN_` prefix."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from mlplatform.settings import ServiceSettings


class CnnSettings(ServiceSettings):
    """Environment: `CNN_GRPC_PORT`, `CNN_MODEL_REPOSITORY`, ...; shared: `REDIS_URL`, `OTEL_...`."""

    model_config = SettingsConfigDict(
        env_prefix="CNN_", extra="ignore", validate_default=True, use_attribute_docstrings=True,
        protected_namespaces=(),
    )

    grpc_port: int = 50052
    """gRPC port of the cnn service."""
    metrics_port: int = 9102
    """Prometheus port of the cnn service."""
    model_name: str = "cnn"
    """Model served."""
