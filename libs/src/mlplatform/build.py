"""Helpers for model-build scripts: progress lines and an atomic write of a model version.

Every service's `build_model` prints `[  t s] step  message` lines and writes
`<repository>/<model>/<version>/` atomically (a temp dir renamed into place), so a
crashed build never leaves a half-written version that the server would load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_clock = {"start": time.perf_counter()}


class BuildError(RuntimeError):
    """The build cannot produce a trustworthy artifact (accuracy too low, parity with the source model failed)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_arg_parser(prog: str, doc: str | None, *, seed: int) -> argparse.ArgumentParser:
    """A build script's parser with the options every build has: --repository, --version, --seed, --force."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--repository", type=Path, required=True, help="model repository root")
    parser.add_argument("--version", type=_positive_int, default=1, help="model version to write (default 1)")
    parser.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the version exists")
    return parser


def run_build(build: Callable[[], object]) -> int:
    """Run a build for a command line: exit status 0, or 1 with the reason on stderr when it raises BuildError."""
    try:
        build()
    except BuildError as exc:
        print(f"build failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def reset_clock() -> None:
    """Start the progress clock (call at the beginning of a build)."""
    _clock["start"] = time.perf_counter()


def log_step(step: str, message: str) -> None:
    """Print one progress line: seconds since `reset_clock`, the step, the message."""
    print(f"[{time.perf_counter() - _clock['start']:6.1f}s] {step:<10} {message}", flush=True)


def json_bytes(obj: Any) -> bytes:
    """Indented JSON with a trailing newline, as written into a version directory."""
    return (json.dumps(obj, indent=2) + "\n").encode()


def write_version(model_dir: Path, version: int, files: dict[str, bytes]) -> Path:
    """Write `files` into a temp dir under `model_dir`, then rename it to `model_dir/<version>`."""
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / str(version)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        for name, content in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if target.exists():  # --force or an incomplete earlier build: swap the old directory out
            old = Path(tempfile.mkdtemp(prefix=f".old-{version}-", dir=model_dir))
            os.rename(target, old / "v")
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old / "v", target)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
