"""Fraud service settings: the shared service settings under the `FRAUD_` prefix."""

from __future__ import annotations

from mlplatform.settings import service_settings

FraudSettings = service_settings("FRAUD_", 50051, 9101, "fraud")
