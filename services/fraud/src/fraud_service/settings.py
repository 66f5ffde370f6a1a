"""Fraud service settings: the shared service settings under the `FRAUD_` prefix."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from mlplatform.settings import ServiceSettings


class FraudSettings(ServiceSettings):
    """Environment: `FRAUD_GRPC_PORT`, `FRAUD_MODEL_REPOSITORY`, ...; shared: `REDIS_URL`, `OTEL_...`."""

    model_config = SettingsConfigDict(
        env_prefix="FRAUD_", extra="ignore", validate_default=True, use_attribute_docstrings=True,
        protected_namespaces=(),
    )

    grpc_port: int = 50051
    """gRPC port of the fraud service."""
    metrics_port: int = 9101
    """Prometheus port of the fraud service."""
    model_name: str = "fraud"
    """Model served."""
