"""Sentiment service: tokenisation, validation, pre/post-processing and wiring; the rest comes from mlplatform."""
