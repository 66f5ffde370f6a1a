"""Generic model service settings: the shared service settings under `GENERIC_`; `GENERIC_MODELS` lists the models."""

from __future__ import annotations

from mlplatform.settings import service_settings

GenericSettings = service_settings("GENERIC_", 50054, 9104)
