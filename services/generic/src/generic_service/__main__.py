"""`python -m generic_service`: serve the config-only models `GENERIC_MODELS` names until SIGTERM/SIGINT."""

from generic_service.settings import GenericSettings
from mlplatform.generic import load
from mlplatform.server import ServiceSpec

SPEC = ServiceSpec(name="generic", default_model="", model_factory=load, settings_cls=GenericSettings)
main = SPEC.main

if __name__ == "__main__":
    raise SystemExit(main())
