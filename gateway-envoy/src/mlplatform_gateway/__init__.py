"""The platform's Envoy gateway: config rendering, dev JWT keys and tokens."""
