"""Fault injection around a model's runtime call, switchable on a running process: for alert tests and chaos drills.

Off unless the environment variable `MLPLATFORM_FAULTS` names a control file (JSON); then every runtime call of
the batcher (`DynamicBatcher._run_checked`, in the runtime thread) goes through `run`, which applies the fault the
file sets for the call's model (or for `"*"`, every model):

    {"diabetes": {"delay_ms": 150, "delay_factor": 1, "error_rate": 0.0, "until": null},
     "*": {"error_rate": 0.01}}

- `delay_ms`: extra latency per runtime call; `delay_factor`: the call takes that many times its own time
  (10: "the model slowed 10x"). Both hold the runtime thread, as a slow runtime would.
- `error_rate`: the share of runtime calls that raise `FaultInjectedError` instead of running. The batcher turns
  it into the request's `InferenceError`, the breaker counts it, and a model with a fallback (fraud) answers with
  its fallback; one without refuses with UNAVAILABLE (`ModelFailedError`, then the breaker's), exactly as for a
  real runtime failure.
- `until`: Unix time after which the fault no longer applies (null: until the file changes).

The file is re-read when it changes (checked at most every `POLL_S` seconds); a missing file means no fault, an
invalid one is logged and means no fault. Write it with `python -m mlplatform.faults` (atomically):

    MLPLATFORM_FAULTS=/tmp/faults.json python -m fraud_service           # the service, injector armed
    python -m mlplatform.faults --file /tmp/faults.json set fraud --delay-factor 10 --for 20
    python -m mlplatform.faults --file /tmp/faults.json set '*' --error-rate 1
    python -m mlplatform.faults --file /tmp/faults.json clear
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

ENV = "MLPLATFORM_FAULTS"
"""Environment variable naming the control file; unset or empty: fault injection is off (no cost per call)."""
POLL_S = 0.25
"""How often, at most, the control file's modification is checked."""
ALL = "*"
"""Key of the fault for every model without its own entry."""

T = TypeVar("T")


class FaultInjectedError(RuntimeError):
    """A runtime call failed on purpose (the control file's `error_rate`)."""


@dataclass(frozen=True)
class Fault:
    """What to do to one model's runtime calls."""

    delay_ms: float = 0.0
    delay_factor: float = 1.0
    error_rate: float = 0.0
    until: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if self.delay_factor < 1:
            raise ValueError(f"delay_factor must be >= 1, got {self.delay_factor}")
        if not 0 <= self.error_rate <= 1:
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate}")

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until


def parse(data: Any) -> dict[str, Fault]:
    """The control file's JSON -> faults by model name; ValueError naming the bad entry."""
    if not isinstance(data, Mapping):
        raise ValueError("the control file must hold a JSON object of model name -> fault")
    faults = {}
    for model, spec in data.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"{model}: a fault is a JSON object")
        unknown = set(spec) - set(Fault.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{model}: unknown field(s) {sorted(unknown)}; known: "
                             f"{sorted(Fault.__dataclass_fields__)}")
        try:
            faults[str(model)] = Fault(**spec)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{model}: {exc}") from exc
    return faults


class FaultInjector:
    """Applies the faults of one control file, re-read when it changes."""

    def __init__(self, path: Path, poll_s: float = POLL_S, rng: random.Random | None = None) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self._rng = rng or random.Random()
        self._faults: dict[str, Fault] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()
        self.injected_errors = 0
        self.injected_delay_s = 0.0

    def fault(self, model: str) -> Fault | None:
        """The fault applying to `model` now, or None."""
        now = time.monotonic()
        if now >= self._next_check:
            self._reload(now)
        fault = self._faults.get(model) or self._faults.get(ALL)
        return fault if fault is not None and fault.active(time.time()) else None

    def _reload(self, now: float) -> None:
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self.poll_s
            try:
                st = self.path.stat()
            except FileNotFoundError:
                if self._faults:
                    log.warning("fault injection: %s removed; no fault", self.path)
                self._faults, self._stamp = {}, None
                return
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                faults = parse(json.loads(self.path.read_text() or "{}"))
            except (OSError, ValueError) as exc:
                log.error("fault injection: ignoring %s (%s); no fault", self.path, exc)
                self._faults = {}
                return
            if faults != self._faults:
                log.warning("fault injection: %s", {m: asdict(f) for m, f in faults.items()} or "no fault")
            self._faults = faults

    def run(self, model: str, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` with `model`'s fault applied: raise instead, or take longer."""
        fault = self.fault(model)
        if fault is None:
            return call(*args)
        if fault.error_rate and self._rng.random() < fault.error_rate:
            self.injected_errors += 1
            raise FaultInjectedError(f"injected fault: {model} runtime call failed ({self.path})")
        start = time.perf_counter()
        result = call(*args)
        extra = fault.delay_ms / 1000 + (fault.delay_factor - 1) * (time.perf_counter() - start)
        if extra > 0:
            self.injected_delay_s += extra
            time.sleep(extra)
        return result


def _from_env() -> FaultInjector | None:
    path = os.environ.get(ENV, "").strip()
    if not path:
        return None
    log.warning("fault injection armed: control file %s (%s)", path, ENV)
    return FaultInjector(Path(path))


INJECTOR: FaultInjector | None = _from_env()
"""The process's injector (None: off), from `MLPLATFORM_FAULTS` at import."""


def run(model: str, call: Callable[..., T], *args: Any) -> T:
    """`call(*args)`, with `model`'s injected fault when fault injection is armed."""
    if INJECTOR is None:
        return call(*args)
    return INJECTOR.run(model, call, *args)


# -- the control file's writer -----------------------------------------------------------------------------------


def write(path: Path, faults: Mapping[str, Fault]) -> None:
    """Replace the control file atomically (a running injector never reads half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({m: asdict(f) for m, f in faults.items()}, indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(body + "\n")
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Fault]:
    """The control file's faults (empty when it does not exist)."""
    try:
        return parse(json.loads(Path(path).read_text() or "{}"))
    except FileNotFoundError:
        return {}


def set_fault(path: Path, model: str, fault: Fault) -> None:
    """Set (replace) `model`'s fault in the control file, keeping the others."""
    write(path, {**read(path), model: fault})


def clear(path: Path, model: str | None = None) -> None:
    """Remove `model`'s fault (None: every fault) from the control file."""
    write(path, {} if model is None else {m: f for m, f in read(path).items() if m != model})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlplatform.faults",
                                     description="Set or clear injected faults of running services.")
    parser.add_argument("--file", type=Path, default=os.environ.get(ENV) or None,
                        help=f"the control file (default: ${ENV})")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("set", help="set a model's fault (replaces its previous one)")
    s.add_argument("model", help=f"model name, or {ALL!r} for every model")
    s.add_argument("--delay-ms", type=float, default=0.0)
    s.add_argument("--delay-factor", type=float, default=1.0)
    s.add_argument("--error-rate", type=float, default=0.0)
    s.add_argument("--for", dest="for_s", type=float, help="seconds the fault lasts (default: until cleared)")
    c = sub.add_parser("clear", help="clear a model's fault, or every fault")
    c.add_argument("model", nargs="?")
    sub.add_parser("show", help="print the control file's faults")
    args = parser.parse_args(argv)
    if args.file is None:
        parser.error(f"--file: no control file given and ${ENV} is not set")
    if args.command == "set":
        try:
            fault = Fault(args.delay_ms, args.delay_factor, args.error_rate,
                          time.time() + args.for_s if args.for_s else None)
        except ValueError as exc:
            parser.error(str(exc))
        set_fault(args.file, args.model, fault)
    elif args.command == "clear":
        clear(args.file, args.model)
    json.dump({m: asdict(f) for m, f in read(args.file).items()}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
