"""A real Prometheus server on loopback (Debian's `/usr/bin/prometheus`), for `OBSERVABILITY=1 make run`
(scripts/run_local.py) and the tests (tests/observability/).

The configuration is the compose stack's `monitoring/prometheus.yml` with its scrape targets replaced by the
local ones (each job keeps its name and metrics path) and its rule files given as absolute paths; the TSDB lives
in a temporary directory that `stop` removes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mlplatform.launch import free_port

ROOT = Path(__file__).resolve().parents[1]

PROMETHEUS_CONFIG = ROOT / "monitoring" / "prometheus.yml"
"""The compose stack's Prometheus configuration, the base of every local one."""
ALERT_RULES = ROOT / "monitoring" / "alerts.yaml"
"""The platform's recording and alert rules (also the cluster's PrometheusRule)."""


def local_config(targets: Mapping[str, Sequence[str]], rule_files: Sequence[Path] = (ALERT_RULES,), *,
                 base: Path = PROMETHEUS_CONFIG, scrape_interval: str | None = None,
                 evaluation_interval: str | None = None) -> dict[str, Any]:
    """`base` with each job's targets replaced by `targets[job]` (`host:port` strings; a job not named keeps no
    target and is dropped), `rule_files` instead of its own, and optionally other global intervals."""
    config = yaml.safe_load(base.read_text())
    unknown = set(targets) - {job["job_name"] for job in config["scrape_configs"]}
    if unknown:
        raise ValueError(f"no scrape job {sorted(unknown)} in {base}")
    jobs = []
    for job in config["scrape_configs"]:
        if targets.get(job["job_name"]):
            jobs.append({**job, "static_configs": [{"targets": list(targets[job["job_name"]])}]})
    config["scrape_configs"] = jobs
    config["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
    if scrape_interval:
        config["global"]["scrape_interval"] = scrape_interval
    if evaluation_interval:
        config["global"]["evaluation_interval"] = evaluation_interval
    return config


class PrometheusServer:
    """`prometheus` on a loopback port with a given configuration; its data in a temporary directory."""

    def __init__(self, config: Mapping[str, Any], port: int | None = None, binary: str | None = None,
                 host: str = "127.0.0.1") -> None:
        self.config = dict(config)
        self.port = port or free_port()
        self.host = host
        self.binary = binary or shutil.which("prometheus") or "/usr/bin/prometheus"
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return self.dir / "prometheus.log" if self.dir else None

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        """Write the configuration, start Prometheus and wait until it is ready (RuntimeError with its log if not)."""
        if not Path(self.binary).exists():
            raise RuntimeError(f"{self.binary} not found: run `make system-deps` (apt-get install prometheus)")
        self.dir = Path(tempfile.mkdtemp(prefix="mlplatform-prometheus-"))
        config_path = self.dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        assert self.log_path is not None
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={config_path}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={self.host}:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=subprocess.DEVNULL, stderr=self.log_path.open("w"), cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready on {self.url} after {timeout:.0f} s")

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET `/api/v1/<path>` -> its `data`; RuntimeError with Prometheus's error otherwise."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result now: [{"metric": {...}, "value": [t, "v"]}, ...] (vector results)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def alerts(self) -> list[dict[str, Any]]:
        """`/api/v1/alerts`: every pending or firing alert, with labels, state and value."""
        return self.api("alerts")["alerts"]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health."""
        return self.api("targets", state="active")["activeTargets"]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Prometheus (SIGTERM, then SIGKILL) and remove its data."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
