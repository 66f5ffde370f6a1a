"""The generic model service: every config-only model it is told to serve (`GENERIC_MODELS`), over OIP."""
