"""`make run` (scripts/run_local.py) as a test drives it: on free loopback ports with its own control socket, its
console read as it goes, and steady REST + gRPC traffic through its gateway that counts every failed request.

Everything is bounded: start-up, each wait, the traffic (it stops by itself after `max_s`), the stop (Ctrl-C,
then SIGKILL of whatever is left).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as rpc
from mlplatform_gateway import auth
from mlplatform_gateway import local as gateway

from tests.gateway.helpers import bearer, http
from tests.support.procs import ROOT, free_port

sys.path.insert(0, str(ROOT / "scripts"))
import supervise  # scripts/supervise.py: the control socket's client

RUN_LOCAL = ROOT / "scripts" / "run_local.py"
ROLLOUT = ROOT / "scripts" / "rollout.py"


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """`condition()`'s first truthy value, polled every 0.1 s; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")


class RunLocal:
    """scripts/run_local.py on free ports (`--services`, `--replicas`), started by `start()`, stopped (Ctrl-C) by
    `stop()`; `output` is its console so far."""

    def __init__(self, tmp_path: Path, model_repository: Path, services: str = "fraud", replicas: int = 1) -> None:
        self.socket = tmp_path / "run.sock"
        self.redis_port, self.gateway_port, self.admin_port = free_port(), free_port(), free_port()
        self.fraud_port, self.fraud_metrics_port = free_port(), free_port()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "GATEWAY_PORT": str(self.gateway_port),
                    "GATEWAY_ADMIN_PORT": str(self.admin_port), "FRAUD_GRPC_PORT": str(self.fraud_port),
                    "FRAUD_METRICS_PORT": str(self.fraud_metrics_port), "FRAUD_GRACE_PERIOD_S": "5"}
        self.command = [sys.executable, str(RUN_LOCAL), "--model-repository", str(model_repository),
                        "--redis-port", str(self.redis_port), "--services", services, "--replicas", str(replicas),
                        "--control-socket", str(self.socket)]
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._seen_pids: set[int] = set()

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)

    def start(self, timeout: float = 120) -> RunLocal:
        self.proc = subprocess.Popen(self.command, env=self.env, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for_output("Press Ctrl-C", timeout)
        return self

    def wait_for_output(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of the regular expression `pattern` in the console (waits for it)."""

        def found() -> re.Match[str] | None:
            assert self.proc is not None
            if self.proc.poll() is not None and not re.search(pattern, self.output):
                time.sleep(0.2)  # the reader's last lines
                raise AssertionError(f"run_local exited ({self.proc.returncode}):\n{self.output[-6000:]}")
            return re.search(pattern, self.output)

        try:
            return wait_until(found, timeout, f"{pattern!r} on run_local's console")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.output[-6000:]}") from None

    def status(self) -> dict[str, Any]:
        """make run's processes (the control socket's `status`)."""
        answer = supervise.control(self.socket, {"op": "status"}, timeout=10)
        assert answer["ok"], answer
        for procs in answer["services"].values():
            self._seen_pids.update(p["pid"] for p in procs if p["pid"])
        if answer["redis"] and answer["redis"]["pid"]:
            self._seen_pids.add(answer["redis"]["pid"])
        return answer

    def replicas(self, service: str = "fraud") -> list[dict[str, Any]]:
        return self.status()["services"][service]

    def rollout(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`make rollout`'s command against this make run."""
        return subprocess.run([sys.executable, str(ROLLOUT), "--control-socket", str(self.socket), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def stop(self, timeout: float = 60) -> int:
        """Ctrl-C; its exit code (SIGKILL to it and to every process it ran when it does not stop in time)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                for pid in self._seen_pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        return self.proc.returncode


class Traffic:
    """Threads calling fraud Predict through the gateway, REST and gRPC, each a few times a second, until stopped
    or `max_s` s have passed. Every request that does not come back 200 / OK with its own answer is a failure."""

    def __init__(self, run: RunLocal, features: list[float], rest_threads: int = 2, grpc_threads: int = 2,
                 interval_s: float = 0.1, max_s: float = 120.0) -> None:
        # The internal tier: the load is not rate-limited (the printed dev-user token allows 100 per minute).
        self.token = auth.mint_token(auth.ensure_dev_keys(gateway.DEFAULT_KEY_DIR), "rollout-test", tier="internal")
        self.run, self.features, self.interval_s, self.max_s = run, features, interval_s, max_s
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rest, args=(i,), daemon=True) for i in range(rest_threads)]
        self._threads += [threading.Thread(target=self._grpc, args=(i,), daemon=True) for i in range(grpc_threads)]

    def _record(self, failure: str | None) -> None:
        with self._lock:
            if failure is None:
                self.ok += 1
            else:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {failure}")

    def _running(self, started: float) -> bool:
        return not self._stop.is_set() and time.monotonic() - started < self.max_s

    def _rest(self, worker: int) -> None:
        started, n = time.monotonic(), 0
        url = f"http://127.0.0.1:{self.run.gateway_port}/api/v1/fraud"
        while self._running(started):
            n += 1
            tx_id = f"rest{worker}-{n}"
            try:
                resp = http("POST", url, {"transaction": {"transaction_id": tx_id, "features": self.features}},
                            token=self.token, timeout=10)
                if resp.status != 200:
                    self._record(f"REST {resp.status} {resp.body[:200]!r}")
                else:
                    got = resp.json()["prediction"]["transaction_id"]
                    self._record(None if got == tx_id else f"REST answer for {got}, not {tx_id}")
            except Exception as exc:  # a reset connection, a body that is not the answer
                self._record(f"REST {type(exc).__name__}: {exc}")
            self._stop.wait(self.interval_s)

    def _grpc(self, worker: int) -> None:
        started, n = time.monotonic(), 0
        with grpc.insecure_channel(f"127.0.0.1:{self.run.gateway_port}") as channel:
            stub = rpc.FraudServiceStub(channel)
            while self._running(started):
                n += 1
                tx_id = f"grpc{worker}-{n}"
                request = pb.PredictRequest(transaction=pb.Transaction(transaction_id=tx_id, features=self.features))
                try:
                    got = stub.Predict(request, metadata=bearer(self.token), timeout=10).prediction.transaction_id
                    self._record(None if got == tx_id else f"gRPC answer for {got}, not {tx_id}")
                except grpc.RpcError as err:
                    self._record(f"gRPC {err.code().name}: {err.details()}")
                self._stop.wait(self.interval_s)

    def wait_for(self, more: int, timeout: float = 30) -> None:
        """Until `more` further requests have succeeded."""
        target = self.ok + more
        wait_until(lambda: self.ok >= target, timeout, f"{more} more successful requests (failures: "
                   f"{self.failures[:3]})")

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
