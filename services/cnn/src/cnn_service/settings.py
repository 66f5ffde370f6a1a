"""Cnn service settings: the shared service settings under the `CNN_` prefix."""

from __future__ import annotations

from mlplatform.settings import service_settings

CnnSettings = service_settings("CNN_", 50052, 9102, "cnn")
