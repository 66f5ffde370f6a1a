"""Helpers for tests that start real processes (Redis, model services) on loopback."""
