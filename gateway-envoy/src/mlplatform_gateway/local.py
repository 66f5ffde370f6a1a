"""Run the gateway as a local process: its files directory, the local render, Envoy's command line,
readiness read from the admin interface, and `GatewayProcess` (all of it on free ports). Shared by
`make run`, the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlplatform_gateway import auth, render

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_KEY_DIR = ROOT / ".dev" / "gateway"
DESCRIPTORS = ROOT / "protos" / "gen" / "descriptors.pb"
OPENAPI_FILE = "openapi.json"
"""The REST API's OpenAPI document (protos/openapi.py), beside descriptors.pb; the gateway serves it."""
DRAIN_TIME_S = 5
"""Local runs' drain window (Envoy's `--drain-time-s`): how long a stopping gateway keeps accepting while it tells
clients to go away (`Connection: close`, HTTP/2 GOAWAY); its listeners close when it ends. Kubernetes uses
longer (k8s/base/platform/gateway/gateway.yaml)."""
GATEWAY_STAT_PREFIX = "gateway"
"""The client listener's http_connection_manager stat_prefix (envoy.yaml.j2)."""


def prepare_files_dir(directory: Path, jwks_path: Path, descriptors: Path = DESCRIPTORS) -> Path:
    """Put descriptors.pb, openapi.json and a copy of `jwks_path` side by side in `directory` (the config's
    files_dir)."""
    if not descriptors.exists():
        raise SystemExit(f"{descriptors} is missing: run `make protos`")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(descriptors, directory / "descriptors.pb")
    openapi = descriptors.with_name(OPENAPI_FILE)
    if not openapi.exists():
        raise SystemExit(f"{openapi} is missing: run `make protos`")
    shutil.copyfile(openapi, directory / OPENAPI_FILE)
    if jwks_path.parent.resolve() != directory.resolve():
        shutil.copyfile(jwks_path, directory / auth.JWKS_FILE)
    return directory


def local_overrides(files_dir: Path, port: int, admin_port: int, endpoints: dict[str, list[str]],
                    access_log: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The local variant's overrides for the given ports and `endpoints` (service -> `host:port` replicas)."""
    base = {"files_dir": str(files_dir), "listener": {"port": port}, "admin": {"port": admin_port},
            "upstreams": {"endpoints": endpoints}, "access_log": {"path": str(access_log)}}
    return render.deep_merge(base, overrides or {})


def render_local(files_dir: Path, port: int, admin_port: int, endpoints: dict[str, list[str]],
                 access_log: Path, overrides: dict[str, Any] | None = None) -> str:
    """The local variant on the given ports, in front of `endpoints` (service -> `host:port` replicas). The SDS
    files its TLS certificates come through (`render.write_secrets`, none without TLS) are written to files_dir."""
    values = local_overrides(files_dir, port, admin_port, endpoints, access_log, overrides)
    render.write_secrets("local", values)
    return render.render("local", values)


def envoy_command(config_path: Path, log_flush_ms: int = 1000, concurrency: int | None = None,
                  drain_time_s: int | None = None) -> list[str]:
    """Envoy's command line for a local process (no hot restart, so several can run side by side).

    `drain_time_s` (`make run` and `GatewayProcess`: DRAIN_TIME_S) adds `--drain-time-s` and `--drain-strategy
    immediate`: once a drain starts (`drain`), every connection is told to close at its next response, not a
    growing share of them over the window; the listeners close `drain_time_s` later. Without it Envoy's defaults
    apply (600 s, gradual)."""
    cmd = [render.envoy_binary(), "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn",
           "--file-flush-interval-msec", str(log_flush_ms)]
    if drain_time_s is not None:
        cmd += ["--drain-time-s", str(drain_time_s), "--drain-strategy", "immediate"]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    return cmd


def run_draining(envoy_args: list[str], admin_port: int) -> int:
    """Run Envoy with `envoy_args` until it exits; on SIGTERM or SIGINT, `drain` it first (for its own
    `--drain-time-s`, else DRAIN_TIME_S), then SIGTERM it. Envoy's exit status.

    A container's stop (`docker stop`, compose, podman) is a bare SIGTERM with no preStop hook: as the image's
    entrypoint this keeps the calls in flight. In Kubernetes the preStop hook has drained already and this
    returns at once."""
    drain_time_s = float(envoy_args[envoy_args.index("--drain-time-s") + 1]) \
        if "--drain-time-s" in envoy_args else DRAIN_TIME_S
    proc = subprocess.Popen([render.envoy_binary(), *envoy_args])
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stopping.is_set():
            return
        stopping.set()

        def stop() -> None:
            with contextlib.suppress(OSError):
                result = drain(admin_port, drain_time_s)
                print(f"gateway drained in {result.waited_s:.1f} s before stopping", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return proc.wait()


def admin_get(admin_port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=2) as resp:
        return resp.read().decode()


def admin_post(admin_port: int, path: str) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{admin_port}{path}", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=2) as resp:
        return resp.read().decode()


@dataclass(frozen=True)
class Downstream:
    """The gateway listener's clients, from its http_connection_manager's stats."""

    connections: int
    """Client connections open (`downstream_cx_active`)."""
    requests_active: int
    """Requests in flight (`downstream_rq_active`)."""
    requests_total: int
    """Requests so far (`downstream_rq_total`)."""


def downstream(admin_port: int, stat_prefix: str = GATEWAY_STAT_PREFIX) -> Downstream:
    """The client listener's connections and requests (stats `http.<stat_prefix>.downstream_*`)."""
    prefix = f"http.{stat_prefix}."
    wanted = ("downstream_cx_active", "downstream_rq_active", "downstream_rq_total")
    pattern = "^" + re.escape(prefix) + "(" + "|".join(wanted) + ")$"
    values = dict.fromkeys(wanted, 0)
    for line in admin_get(admin_port, "/stats?filter=" + urllib.parse.quote(pattern)).splitlines():
        key, _, value = line.partition(":")
        name = key.strip().removeprefix(prefix)
        if name in values:
            values[name] = int(value)
    return Downstream(*values.values())


@dataclass(frozen=True)
class DrainResult:
    """How a drain went: seconds waited, and client connections still open when it stopped waiting (idle ones,
    or any when the drain time ran out)."""

    waited_s: float
    connections_left: int


def drain(admin_port: int, drain_time_s: float = DRAIN_TIME_S, min_wait_s: float = 0.0, quiet_s: float = 1.0,
          poll_s: float = 0.1) -> DrainResult:
    """Drain the gateway before its SIGTERM (on a bare SIGTERM Envoy closes its listeners at once and resets every
    call in flight).

    `/healthcheck/fail` (`/healthz` answers 503, so load balancers stop choosing this gateway, and every
    connection is closed after its current response), then `/drain_listeners?graceful` (Envoy's drain sequence:
    HTTP/1 `Connection: close`, HTTP/2 GOAWAY; the listeners keep accepting for `--drain-time-s`, then close),
    then wait at least `min_wait_s` (Kubernetes: until the endpoint removal has reached every client) and until
    every client connection is closed, or only idle ones are left (no request in flight and none started for
    `quiet_s`: Envoy closes an idle keep-alive connection only at its next request), at most `drain_time_s`.
    Used by `make run`'s stop, `GatewayProcess.stop` and the Kubernetes preStop hook
    (`python -m mlplatform_gateway drain`)."""
    start = time.monotonic()
    admin_post(admin_port, "/healthcheck/fail")
    admin_post(admin_port, "/drain_listeners?graceful")
    last_total, quiet_since, left = -1, start, 0
    while True:
        now = time.monotonic()
        try:
            d = downstream(admin_port)
        except OSError:
            left = 0  # the admin interface is gone (Envoy exited): nothing left to wait for
            break
        left = d.connections
        if d.requests_total != last_total or d.requests_active:
            last_total, quiet_since = d.requests_total, now
        idle = d.connections == 0 or now - quiet_since >= quiet_s
        if (now - start >= min_wait_s and idle) or now - start >= drain_time_s:
            break
        time.sleep(poll_s)
    return DrainResult(round(time.monotonic() - start, 3), left)


def healthy_hosts(admin_port: int, clusters: Collection[str] | None = None) -> int:
    """Hosts passing their health checks, in `clusters` (all clusters when None)."""
    return sum(1 for line in admin_get(admin_port, "/clusters").splitlines()
               if line.endswith("::health_flags::healthy")
               and (clusters is None or line.split("::", 1)[0] in clusters))


@dataclass(frozen=True)
class HostStatus:
    """One upstream host as the admin interface's /clusters shows it."""

    health_flags: str = ""
    """`healthy`, or the reasons it is not (`/failed_active_hc`, `/failed_outlier_check`, ...)."""
    rq_active: int = 0
    """Requests in flight to the host (REST and gRPC alike: both go through the cluster)."""

    @property
    def healthy(self) -> bool:
        return self.health_flags == "healthy"

    @property
    def failed_active_hc(self) -> bool:
        """Out of rotation because its active health check fails (NOT_SERVING, or nothing listening)."""
        return "/failed_active_hc" in self.health_flags


def host_statuses(admin_port: int) -> dict[tuple[str, str], HostStatus]:
    """(cluster, `host:port`) -> the host's health flags and requests in flight, from admin /clusters."""
    stats: dict[tuple[str, str], dict[str, str]] = {}
    for line in admin_get(admin_port, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] in ("health_flags", "rq_active"):
            stats.setdefault((parts[0], parts[1]), {})[parts[2]] = parts[3]
    return {key: HostStatus(s.get("health_flags", ""), int(s.get("rq_active", "0"))) for key, s in stats.items()}


def is_live(admin_port: int) -> bool:
    """Envoy has finished initialising and its listeners accept connections."""
    return admin_get(admin_port, "/ready").strip() == "LIVE"


def _free_port() -> int:
    # mlplatform-libs is not installed in the gateway image, which imports this module (`ready`).
    from mlplatform.launch import free_port

    return free_port()


@dataclass
class GatewayProcess:
    """The real Envoy gateway (local variant) on free ports in front of the given upstream endpoints.

    `endpoints` maps a service name (services.yaml) to its `host:port` replicas. The JWKS and
    the descriptor set are copied into a private directory; the JSON access log goes there too.
    """

    endpoints: dict[str, list[str]]
    jwks_path: Path
    overrides: dict = field(default_factory=dict)
    port: int = field(default_factory=_free_port)
    admin_port: int = field(default_factory=_free_port)
    concurrency: int | None = None
    drain_time_s: int = DRAIN_TIME_S
    proc: subprocess.Popen | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gateway-")))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def access_log_path(self) -> Path:
        return self.workdir / "access.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "envoy.yaml"

    @property
    def values(self) -> dict[str, Any]:
        """The overrides of the local variant this gateway is rendered with."""
        return local_overrides(self.workdir, self.port, self.admin_port, self.endpoints, self.access_log_path,
                               self.overrides)

    def render(self) -> str:
        """The config text; descriptors, JWKS and the SDS files are put in the workdir first."""
        prepare_files_dir(self.workdir, self.jwks_path)
        return render_local(self.workdir, self.port, self.admin_port, self.endpoints, self.access_log_path,
                            self.overrides)

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.config_path.write_text(self.render())
        log = (self.workdir / "envoy.log").open("w")
        cmd = envoy_command(self.config_path, log_flush_ms=200, concurrency=self.concurrency,
                            drain_time_s=self.drain_time_s)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        for cluster, hosts in self.endpoints.items():
            self.wait_healthy(len(hosts), timeout, cluster=cluster)
        return self

    def admin(self, path: str) -> str:
        return admin_get(self.admin_port, path)

    def healthy_hosts(self, cluster: str | None = None) -> int:
        # The module-level healthy_hosts (a method name does not shadow a global inside the class).
        return healthy_hosts(self.admin_port, None if cluster is None else {cluster})

    def wait_healthy(self, hosts: int, timeout: float = 30.0, cluster: str | None = None) -> None:
        """Until Envoy is LIVE and exactly `hosts` upstream hosts pass their health checks."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if is_live(self.admin_port) and self.healthy_hosts(cluster) == hosts:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway: {hosts} healthy hosts not reached after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        path = self.workdir / "envoy.log"
        return path.read_text() if path.exists() else ""

    def access_log(self) -> list[dict]:
        """The JSON access log lines written so far."""
        if not self.access_log_path.exists():
            return []
        return [json.loads(line) for line in self.access_log_path.read_text().splitlines() if line.strip()]

    def stop(self, graceful: bool = True) -> DrainResult | None:
        """`drain`, then SIGTERM (what `make run` does: no call lost); `graceful=False`: SIGTERM alone, which
        Envoy answers by closing every connection at once. The drain's result, when there was one."""
        result = None
        if self.proc and self.proc.poll() is None:
            if graceful:
                with contextlib.suppress(OSError):  # no admin interface: SIGTERM it all the same
                    result = drain(self.admin_port, self.drain_time_s)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        return result
