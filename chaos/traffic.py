"""Steady mixed traffic through the gateway (bench.loadgen, open loop, in a thread while the main thread injects
the fault) and the `Verifier`, which keeps asking questions whose right answer it learned from the healthy
platform and counts answers that differ."""

from __future__ import annotations

import base64
import http.client
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.loadgen import Payloads, Phase, Target
from bench.stack import keys_for, tokens
from chaos.report import Checks

MIX = {"fraud/rest": 0.35, "fraud/grpc": 0.25, "sentiment/rest": 0.2, "cnn/grpc": 0.2}
"""Share of the steady traffic per model/path, all through the gateway: fraud REST (30 features), fraud gRPC by
card_id (online features from Redis, Zipf-drawn customers), sentiment REST, cnn gRPC (PNG digits)."""
TIMEOUT_S = 20.0
"""The client's deadline: longer than the gateway's per-try timeout plus a retry, so a hang shows as latency
(or the gateway's own answer), not as the client giving up first."""


def targets(gateway: str, rate: float, duration_s: float, tag: str, mix: dict[str, float] | None = None
            ) -> list[Target]:
    """The mix's loadgen targets against `gateway` (host:port), with enough distinct API keys per target to stay
    under the gateway's per-key rate limit at `rate` for `duration_s`."""
    out = []
    for name, weight in (mix or MIX).items():
        model, kind = name.split("/")
        toks = tokens(keys_for(rate * weight, duration_s), f"{tag}-{model}-{kind}")
        payloads = Payloads(loadgen.CARDS_SOURCE) if name == "fraud/grpc" else None
        out.append(Target(model, kind, gateway, toks, weight=weight, payloads=payloads))
    return out


@dataclass
class Traffic:
    """One run of the mix in a background thread: `start()`, then `wait_started()` (the common start time is
    fixed), the fault, then `join()` for the `loadgen.Result`."""

    gateway: str
    rate: float
    duration_s: float
    tag: str
    mix: dict[str, float] | None = None
    processes: int = 1
    result: loadgen.Result | None = None
    error: BaseException | None = None
    start_wall: float | None = None

    def __post_init__(self) -> None:
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{self.tag}", daemon=True)

    def _run(self) -> None:
        def on_start() -> None:
            self.start_wall = time.time() + 0.1  # loadgen.run's common start
            self._started.set()

        try:
            self.result = loadgen.run(targets(self.gateway, self.rate, self.duration_s, self.tag, self.mix),
                                      [Phase(self.duration_s, self.rate)], processes=self.processes,
                                      timeout_s=TIMEOUT_S, on_start=on_start)
        except BaseException as exc:  # reported by join()
            self.error = exc
            self._started.set()

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def wait_started(self, timeout: float = 180.0) -> None:
        if not self._started.wait(timeout):
            raise TimeoutError("the load generator did not start")
        if self.error is not None:
            raise self.error
        wait = (self.start_wall or time.time()) - time.time()
        if wait > 0:
            time.sleep(wait)

    def now(self) -> float:
        """Seconds since the traffic's start."""
        return time.time() - (self.start_wall or time.time())

    def sleep_until(self, t: float) -> None:
        """Sleep until `t` seconds after the traffic's start."""
        wait = t - self.now()
        if wait > 0:
            time.sleep(wait)

    def join(self) -> loadgen.Result:
        self._thread.join(self.duration_s + TIMEOUT_S + loadgen.RESULT_MARGIN_S + 120)
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise RuntimeError("the load generator returned no result")
        return self.result


# ---------------------------------------------------------------- answers checked against the healthy platform

VOLATILE = frozenset({"cached", "transactionId", "transaction_id", "id", "modelVersion", "model_version"})
"""Fields that may differ between two right answers to the same question."""


def _repo_inputs(repository: Path) -> list[tuple[str, dict[str, Any]]]:
    """A few fixed questions per model: (path, JSON body)."""
    fraud = json.loads((repository / "fraud" / "1" / "sample.json").read_text())["rows"]
    qs: list[tuple[str, dict[str, Any]]] = [
        ("/api/v1/fraud", {"transaction": {"transaction_id": f"check-{i}", "features": row["features"]}})
        for i, row in enumerate(fraud[:3])]
    qs += [("/api/v1/sentiment", {"text": t}) for t in (
        "Not bad at all, I would buy it again.", "The support team never called back.",
        "Delivery was quick and the fit is perfect.")]
    sample = repository / "cnn" / "1" / "sample.png"
    if sample.exists():
        qs.append(("/api/v1/cnn", {"image": base64.b64encode(sample.read_bytes()).decode(), "top_k": 3}))
    return qs


def comparable(answer: Any) -> Any:
    """The answer without its volatile fields (recursively)."""
    if isinstance(answer, dict):
        return {k: comparable(v) for k, v in answer.items() if k not in VOLATILE}
    if isinstance(answer, list):
        return [comparable(v) for v in answer]
    return answer


def same(a: Any, b: Any, rel: float = 1e-3, abs_: float = 1e-4) -> bool:
    """Equal answers, numbers within a tolerance (batching may change the last float digits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], rel, abs_) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, rel, abs_) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)
    return a == b


def flagged_fallback(answer: Any) -> bool:
    """The answer says it came from the model's fallback (fraud's `prediction.fallback`)."""
    pred = answer.get("prediction") if isinstance(answer, dict) else None
    return bool(isinstance(pred, dict) and pred.get("fallback"))


@dataclass
class Verifier:
    """Asks the fixed questions through the gateway (REST) at `rate` per second in a thread, and compares every
    answer with the one the healthy platform gave (learned by `learn()`)."""

    host: str
    port: int
    repository: Path
    rate: float = 4.0
    timeout_s: float = TIMEOUT_S
    models: tuple[str, ...] | None = None
    """Ask only about these models (default: fraud, sentiment and cnn)."""
    expected: dict[int, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.questions = [(path, body) for path, body in _repo_inputs(self.repository)
                          if self.models is None or path.rsplit("/", 1)[1] in self.models]
        self.tokens = tokens(keys_for(self.rate, 600), "chaos-verifier")
        self._i = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.checks = Checks()

    def ask(self, q: int) -> tuple[int, Any]:
        """(HTTP status, parsed JSON or the raw text) of question `q`."""
        path, body = self.questions[q]
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            token = self.tokens[self._i % len(self.tokens)]
            self._i += 1
            conn.request("POST", path, json.dumps(body), {"content-type": "application/json",
                                                         "authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            data = resp.read()
            try:
                return resp.status, json.loads(data)
            except ValueError:
                return resp.status, data[:200].decode(errors="replace")
        finally:
            conn.close()

    def learn(self) -> None:
        """The healthy platform's answer to every question (ValueError when one is not a 200)."""
        for q in range(len(self.questions)):
            status, answer = self.ask(q)
            if status != 200 or flagged_fallback(answer):
                raise ValueError(f"{self.questions[q][0]}: the healthy platform answered {status}: {answer}")
            self.expected[q] = comparable(answer)

    def check_one(self, q: int, checks: Checks) -> None:
        checks.sent += 1
        try:
            status, answer = self.ask(q)
        except (OSError, http.client.HTTPException) as exc:
            checks.add_failure(f"client_{type(exc).__name__}")
            return
        if status != 200:
            checks.add_failure(f"http_{status}")
            if len(checks.examples) < 3:
                checks.examples.append(f"{self.questions[q][0]} -> {status} {str(answer)[:160]}")
            return
        if flagged_fallback(answer):
            checks.fallback += 1
        elif same(comparable(answer), self.expected[q]):
            checks.same += 1
        else:
            checks.wrong += 1
            if len(checks.examples) < 3:
                checks.examples.append(f"WRONG {self.questions[q][0]}: {answer} (expected {self.expected[q]})")

    def start(self) -> Verifier:
        """Start checking in the background, with fresh counts."""
        self.checks = Checks()
        self._stop.clear()

        def loop() -> None:
            q = 0
            while not self._stop.is_set():
                t0 = time.monotonic()
                self.check_one(q % len(self.questions), self.checks)
                q += 1
                self._stop.wait(max(0.0, 1 / self.rate - (time.monotonic() - t0)))

        self._thread = threading.Thread(target=loop, name="verifier", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Checks:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)
        return self.checks


def run_concurrently(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run each function in its own thread; their results (or exceptions) in order."""
    results: list[Any] = [None] * len(fns)

    def call(i: int) -> None:
        try:
            results[i] = fns[i]()
        except Exception as exc:  # returned to the caller
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
