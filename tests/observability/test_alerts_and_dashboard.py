"""The seed's alerts fire for real: a real model service under steady traffic, a real Prometheus (Debian's
`prometheus`) scraping it every second with the platform's rules, and faults injected into the running service
(mlplatform.faults, through its control file): a slowed model makes `InferenceLatencyP95High` fire, injected
runtime failures make `InferenceErrorRateHigh` fire, both read from Prometheus's `/api/v1/alerts`, and both
resolve once the fault is removed. Then every query of the Grafana dashboard is evaluated against that Prometheus.

The rules are monitoring/alerts.yaml's with every duration divided by 30 (tests/observability/rules.py: `[5m]`
rates become `[10s]`, `for: 5m` becomes `for: 10s`, the 30 s evaluation 1 s), so that firing and resolving take
seconds; the expressions, thresholds and labels are the file's own.

The service is the generic one serving `diabetes` (no fallback: an injected failure reaches the client as
UNAVAILABLE, "not served, retry", as it would for fraud without its fallback; INTERNAL would be a bug), with an
in-process prediction cache (one request in four repeats a row: cache hits) and a latency budget wide enough that
admission control never refuses the slowed model's requests (a refusal is a server error too, and would mix the
two alerts).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mlplatform import faults
from tests.observability.load import Load
from tests.observability.rules import duration, scaled_rules
from tests.support.metrics import delta, scrape
from tests.support.procs import ROOT, ServiceProcess

sys.path.insert(0, str(ROOT / "scripts"))
from observability import ALERT_RULES, PrometheusServer, local_config  # scripts/observability.py

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus "
                                 "(make system-deps)")]

SPEEDUP = 30
"""Every duration of the rules divided by this (5 min windows -> 10 s)."""
MODEL = "diabetes"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "mlplatform.json"
FIRE_TIMEOUT_S = 90.0
"""Bound on each wait for an alert to fire or resolve (a 10 s window and a 10 s `for`: ~20 s when not starved)."""
SERVER_ERRORS = ("INTERNAL", "UNAVAILABLE")


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def control_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults") / "faults.json"


@pytest.fixture(scope="module")
def service(model_repository: Path, control_file: Path) -> Iterator[ServiceProcess]:
    svc = ServiceProcess("generic_service", "GENERIC_", env={
        "GENERIC_MODEL_REPOSITORY": str(model_repository), "GENERIC_MODELS": MODEL,
        "GENERIC_LATENCY_BUDGET_MS": "10000", faults.ENV: str(control_file),
        # The alerts alone: at a 20 % error rate, 5 failures in a row (the default breaker) happen now and then
        # and open the breaker, which refuses everything for a while (tests/libs/test_breaker.py covers it).
        "GENERIC_BREAKER_FAIL_MAX": "1000"}).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def prometheus(service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    import yaml

    rules = tmp_path_factory.mktemp("rules") / "alerts.yaml"
    rules.write_text(yaml.safe_dump(scaled_rules(ALERT_RULES, SPEEDUP), sort_keys=False))
    config = local_config({"model-services": [f"127.0.0.1:{service.metrics_port}"]}, [rules],
                          scrape_interval="1s", evaluation_interval=duration(30 / SPEEDUP))
    server = PrometheusServer(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def load(service: ServiceProcess, prometheus: PrometheusServer, model_repository: Path) -> Iterator[Load]:
    limits = json.loads((model_repository / MODEL / "1" / "config.json").read_text())["parameters"]["limits"]
    traffic = Load(service.target, (limits["features"]["min"], limits["features"]["max"])).start()
    wait_until(lambda: prometheus.query(f'model:inference_requests:rate5m{{model="{MODEL}"}}'), 60,
               "the recording rules see the traffic")
    yield traffic
    traffic.stop()


def alert(prom: PrometheusServer, name: str) -> dict[str, Any] | None:
    """The alert `name` for the model, from /api/v1/alerts (pending or firing), or None."""
    return next((a for a in prom.alerts() if a["labels"].get("alertname") == name
                 and a["labels"].get("model") == MODEL), None)


def firing(prom: PrometheusServer, name: str) -> dict[str, Any] | None:
    found = alert(prom, name)
    return found if found and found["state"] == "firing" else None


def test_prometheus_scrapes_the_service_with_the_platform_rules(prometheus, service, load):
    [target] = prometheus.targets()
    assert target["health"] == "up" and target["labels"]["job"] == "model-services"
    assert target["scrapeUrl"] == f"http://127.0.0.1:{service.metrics_port}/metrics"
    import yaml

    expected = {g["name"]: [r.get("alert") or r["record"] for r in g["rules"]]
                for g in yaml.safe_load(ALERT_RULES.read_text())["groups"]}
    groups = prometheus.api("rules")["groups"]
    assert {g["name"]: [r["name"] for r in g["rules"]] for g in groups} == expected
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    assert {g["name"]: g["interval"] for g in groups} == {"mlplatform.recording": 1, "mlplatform.alerts": 1}
    assert prometheus.query("up") and float(prometheus.query("up")[0]["value"][1]) == 1.0


def test_latency_alert_fires_with_a_slowed_model_and_resolves(prometheus, service, load, control_file):
    # Quiet before (a start-up's slow first calls leave the 10 s window within seconds).
    wait_until(lambda: alert(prometheus, "InferenceLatencyP95High") is None, FIRE_TIMEOUT_S, "no latency alert")
    faults.set_fault(control_file, MODEL, faults.Fault(delay_ms=150))
    t0 = time.monotonic()
    try:
        fired = wait_until(lambda: firing(prometheus, "InferenceLatencyP95High"), FIRE_TIMEOUT_S,
                           "InferenceLatencyP95High firing")
        fired_after = time.monotonic() - t0
        assert fired["labels"]["severity"] == "page" and float(fired["value"]) > 0.1, fired
        assert "p95 latency" in fired["annotations"]["summary"]
        # Slow, not failing: the clients got answers, taking the injected time, and the error alert stayed quiet.
        slowed = load.since(t0 + 2)
        assert {s.status for s in slowed} == {"OK"}, load.statuses(t0)
        assert sorted(s.latency_s for s in slowed)[int(0.5 * len(slowed))] >= 0.15
        assert alert(prometheus, "InferenceErrorRateHigh") is None
    finally:
        faults.clear(control_file)
    t1 = time.monotonic()
    wait_until(lambda: alert(prometheus, "InferenceLatencyP95High") is None, FIRE_TIMEOUT_S,
               "InferenceLatencyP95High resolved")
    resolved_after = time.monotonic() - t1
    print(f"latency alert: firing {fired_after:.1f} s after the slow-down (p95 {float(fired['value']) * 1000:.0f} ms), "
          f"resolved {resolved_after:.1f} s after it ended")


def test_error_rate_alert_fires_with_injected_failures_and_resolves(prometheus, service, load, control_file):
    wait_until(lambda: alert(prometheus, "InferenceErrorRateHigh") is None, FIRE_TIMEOUT_S, "no error alert")
    before = scrape(service.metrics_port)
    faults.set_fault(control_file, MODEL, faults.Fault(error_rate=0.2))
    t0 = time.monotonic()
    try:
        fired = wait_until(lambda: firing(prometheus, "InferenceErrorRateHigh"), FIRE_TIMEOUT_S,
                           "InferenceErrorRateHigh firing")
        fired_after = time.monotonic() - t0
        assert fired["labels"]["severity"] == "page" and float(fired["value"]) > 0.001, fired
    finally:
        faults.clear(control_file)
    t1 = time.monotonic()
    seen = load.statuses(t0)
    failed = sum(seen[s] for s in SERVER_ERRORS)
    assert failed > 0 and set(seen) <= {"OK", "UNAVAILABLE"}, seen  # real failures, seen by the clients, as refusals
    # Under 20 %: cache hits never reach the model, and a failed batch's requests are retried one by one.
    assert 0.01 < failed / sum(seen.values()) < 0.5, seen
    after = scrape(service.metrics_port)
    counted = {s: delta(before, after, "inference_requests_total", model=MODEL, version="1", method="ModelInfer",
                        status=s) for s in SERVER_ERRORS}
    assert seen["UNAVAILABLE"] > 0 and all(counted[s] >= seen[s] for s in SERVER_ERRORS), (counted, seen)  # metrics
    wait_until(lambda: alert(prometheus, "InferenceErrorRateHigh") is None, FIRE_TIMEOUT_S,
               "InferenceErrorRateHigh resolved")
    resolved_after = time.monotonic() - t1
    ratio = f'model:inference_request_error_ratio:rate5m{{model="{MODEL}"}}'
    assert float(prometheus.query(ratio)[0]["value"][1]) <= 0.001
    print(f"error alert: firing {fired_after:.1f} s after failures began ({float(fired['value']):.1%} failing, "
          f"clients saw {dict(seen)}), resolved {resolved_after:.1f} s after they ended")


RATE_INTERVAL = "30s"
"""What Grafana's `$__rate_interval` stands for here (at least 4 scrapes of 1 s)."""


def nvml_gpus() -> int:
    """GPUs NVML finds from here (0 without nvidia-ml-py, a driver or a GPU): what the services' collector sees."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


MAY_BE_EMPTY = {} if nvml_gpus() else {
    "GPU memory used": "inference_gpu_memory_used_bytes exists only where NVML finds a GPU (metrics.register_"
                       "gpu_memory_collector); without one (CPU machines, no nvidia-ml-py) it has no series",
}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, with the dashboard's variables filled in."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$model", ".*"))
            for p in dash["panels"] for t in p["targets"]]


def test_every_dashboard_query_has_data(prometheus, service, load, control_file):
    """Every panel's query returns series from the running Prometheus (the errors panel after a short burst of
    injected failures, when no earlier test caused some); GPU memory may be empty where NVML finds no GPU
    (MAY_BE_EMPTY says why), its query must still be valid."""
    server_errors = f'inference_requests_total{{model="{MODEL}", status=~"{"|".join(SERVER_ERRORS)}"}}'
    if not prometheus.query(server_errors):
        faults.set_fault(control_file, MODEL, faults.Fault(error_rate=0.5, until=time.time() + 3))
        wait_until(lambda: prometheus.query(server_errors), 30, "server errors scraped")
    queries = dashboard_queries()
    titles = {t for t, _ in queries}
    assert titles >= {"Latency p50 / p95 / p99 per model", "Throughput", "Errors", "Queue depth", "Batch size",
                      "Cache hit rate", "Circuit breaker state", "GPU memory used"}, titles
    empty = []
    for title, expr in queries:
        result = prometheus.query(expr)  # raises on an invalid query
        if not result and title not in MAY_BE_EMPTY:
            empty.append((title, expr))
        if title == "Circuit breaker state":
            assert {r["metric"]["breaker"] for r in result} >= {f"model-{MODEL}"}
        if title == "Cache hit rate":
            [hit_rate] = [float(r["value"][1]) for r in result if r["metric"]["model"] == MODEL]
            assert 0.05 < hit_rate < 0.6, hit_rate  # one request in four repeats a row
    assert not empty, f"panels without data: {empty}"
    models = prometheus.query(re.sub(r"label_values\((\w+), (\w+)\)", r"group by (\2) (\1)",
                                     json.loads(DASHBOARD.read_text())["templating"]["list"][0]["definition"]))
    assert [m["metric"]["model"] for m in models] == [MODEL]
