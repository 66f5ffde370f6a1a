"""Run the gateway as a local process: its files directory, the local render, Envoy's command line,
and readiness read from the admin interface. Shared by `make run`, the tests and the benchmarks."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Collection
from pathlib import Path
from typing import Any

from mlplatform_gateway import auth, render

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_KEY_DIR = ROOT / ".dev" / "gateway"
DESCRIPTORS = ROOT / "protos" / "gen" / "descriptors.pb"


def prepare_files_dir(directory: Path, jwks_path: Path, descriptors: Path = DESCRIPTORS) -> Path:
    """Put descriptors.pb and a copy of `jwks_path` side by side in `directory` (the config's files_dir)."""
    if not descriptors.exists():
        raise SystemExit(f"{descriptors} is missing: run `make protos`")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(descriptors, directory / "descriptors.pb")
    if jwks_path.parent.resolve() != directory.resolve():
        shutil.copyfile(jwks_path, directory / auth.JWKS_FILE)
    return directory


def render_local(files_dir: Path, port: int, admin_port: int, endpoints: dict[str, list[str]],
                 access_log: Path, overrides: dict[str, Any] | None = None) -> str:
    """The local variant on the given ports, in front of `endpoints` (service -> `host:port` replicas)."""
    base = {"files_dir": str(files_dir), "listener": {"port": port}, "admin": {"port": admin_port},
            "upstreams": {"endpoints": endpoints}, "access_log": {"path": str(access_log)}}
    return render.render("local", render.deep_merge(base, overrides or {}))


def envoy_command(config_path: Path, log_flush_ms: int = 1000) -> list[str]:
    """Envoy's command line for a local process (no hot restart, so several can run side by side)."""
    return [render.envoy_binary(), "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn",
            "--file-flush-interval-msec", str(log_flush_ms)]


def admin_get(admin_port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=2) as resp:
        return resp.read().decode()


def healthy_hosts(admin_port: int, clusters: Collection[str] | None = None) -> int:
    """Hosts passing their health checks, in `clusters` (all clusters when None)."""
    return sum(1 for line in admin_get(admin_port, "/clusters").splitlines()
               if line.endswith("::health_flags::healthy")
               and (clusters is None or line.split("::", 1)[0] in clusters))


def is_live(admin_port: int) -> bool:
    """Envoy has finished initialising and its listeners accept connections."""
    return admin_get(admin_port, "/ready").strip() == "LIVE"
