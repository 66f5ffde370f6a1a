"""Fraud scoring service: validation, pre/post-processing and wiring; the rest comes from mlplatform."""
