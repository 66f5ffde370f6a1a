"""Fraud service settings: the shared service settings under the `FRAUD_` prefix, plus online features."""

from __future__ import annotations

from pydantic import Field

from mlplatform.settings import service_settings


class FraudSettings(service_settings("FRAUD_", 50051, 9101, "fraud")):  # type: ignore[misc]
    """Environment: `FRAUD_GRPC_PORT`, `FRAUD_FEATURE_STORE_URL`, ...; shared: `REDIS_URL`."""

    feature_store_url: str | None = None
    """Redis of the online feature store and the audit stream; unset: `REDIS_URL`; neither: scoring by card uses
    the cold-start defaults (flagged `store_unavailable`)."""
    feature_timeout_ms: float = Field(20.0, gt=0)
    """Bound on one feature read (one pipeline); slower reads use the defaults and count as breaker failures."""
    feature_breaker_reset_s: float = Field(5.0, gt=0)
    """How long the feature store's breaker stays open before a trial read."""
    audit_stream: str = Field("fraud:audit", min_length=1)
    """Redis stream the predictions are appended to (read it with XRANGE / XREAD)."""
    audit_max_len: int = Field(1_000_000, ge=1)
    """Approximate cap of the audit stream (XADD MAXLEN ~)."""
    write_buffer_items: int = Field(10_000, ge=1)
    """Write-behind buffer (card updates + audit records); when full, writes are dropped and counted."""
