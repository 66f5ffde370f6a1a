"""Threads that run models, at a lower CPU priority than the event loop.

A busy runtime (a Transformer batch on every core) must not starve the event loop: that is where
requests are read, refused when the model is overloaded, and answered. Model load, warm-up and
inference run on threads whose nice value is raised by `RUNTIME_NICE` (Linux keeps a nice value
per thread, and threads inherit it when created, so the pools a runtime starts from those threads,
ONNX Runtime's at session creation and PyTorch's at its first parallel op, inherit it too). The
runtime still gets every cycle nobody else wants; the loop, the gateway and the clients come first
when the cores are contended, so refusals stay fast under overload.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

RUNTIME_NICE = int(os.environ.get("MLPLATFORM_RUNTIME_NICE", "10"))
"""How much lower than the event loop's priority runtime threads run (0: the same)."""


def lower_priority(nice: int | None = None) -> None:
    """Raise the calling thread's nice value by `nice` (default `RUNTIME_NICE`); a no-op where unsupported."""
    step = RUNTIME_NICE if nice is None else nice
    if step <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except OSError as exc:  # e.g. a sandbox without the syscall: keep the default priority
        log.debug("could not lower the runtime thread's priority: %s", exc)


def runtime_executor(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool for runtime calls whose threads run at the lowered priority."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=lower_priority)


LOADER = runtime_executor(1, "runtime-load")
"""Where models are loaded and warmed up (so the runtimes' own thread pools inherit the priority)."""
