"""Start and stop real processes on loopback ports (Redis, a model service), for the tests and the benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Nothing listens on (or holds) 127.0.0.1:`port` right now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def grpc_serving(port: int, host: str = "127.0.0.1") -> bool:
    """The process on `host:port` answers grpc.health.v1 (overall health) with SERVING."""
    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class RedisServer:
    """A real redis-server on a free loopback port, no persistence."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make system-deps` (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@dataclass
class ServiceProcess:
    """A model service (`python -m <module>`) on free ports; logs go to a file shown on failure."""

    module: str
    env_prefix: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    health_port: int | None = None
    """A plaintext health-only port (`<PREFIX>HEALTH_PORT`, for a service whose gRPC port serves TLS): health
    checks go there."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 60.0) -> ServiceProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith((self.env_prefix, "REDIS_URL", "OTEL_"))}
        env.update({
            f"{self.env_prefix}GRPC_PORT": str(self.port),
            f"{self.env_prefix}METRICS_PORT": str(self.metrics_port),
            f"{self.env_prefix}HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        })
        if self.health_port is not None:
            env[f"{self.env_prefix}HEALTH_PORT"] = str(self.health_port)
        env.update(self.env)
        fd, name = tempfile.mkstemp(prefix=f"{self.module}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module], env=env, cwd=ROOT,
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_serving(timeout)
        return self

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def health(self, service: str = "", timeout: float = 1.0) -> int:
        """The grpc.health.v1 status (SERVING=1, NOT_SERVING=2); raises grpc.RpcError when unreachable."""
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port or self.port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout)
            return resp.status

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.module} not SERVING after {timeout}s:\n{self.logs()}")

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown) without waiting."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        self.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc
