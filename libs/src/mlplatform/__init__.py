"""Shared serving libraries: everything that is not specific to one model.

Modules, one concern each: settings, repository (model repository and config),
tensors, runtimes, model, batching, cache, breaker, pipeline, metrics, tracing,
interceptors, streaming, oip (Open Inference Protocol servicer), server.
Import the module you need; nothing here is imported eagerly.
"""

__version__ = "0.1.0"
