"""Inference runtimes. Each exposes `run(inputs) -> outputs` on numpy arrays (blocking;
callers run it off the event loop) and reports the device it actually uses."""
