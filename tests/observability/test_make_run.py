"""`OBSERVABILITY=1 make run`: scripts/run_local.py also starts Debian's Prometheus, scraping every service slot and
Envoy with the platform's rules loaded, and stops it with everything else on Ctrl-C."""

from __future__ import annotations

import shutil
import sys
import urllib.request

import pytest

from tests.scripts.stack import RunLocal, wait_until
from tests.support.procs import ROOT, free_port

sys.path.insert(0, str(ROOT / "scripts"))
from observability import PrometheusServer  # scripts/observability.py

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus "
                                 "(make system-deps)")]


def test_make_run_with_observability_starts_prometheus_on_every_service_and_envoy(tmp_path, model_repository):
    run = RunLocal(tmp_path, model_repository, services="fraud")
    port = free_port()
    run.env["OBSERVABILITY"] = "1"
    run.command += ["--prometheus-port", str(port)]
    run.start(timeout=180)
    try:
        run.wait_for_output(rf"prometheus: http://127.0.0.1:{port} .*scraping 3 targets", 5)
        prom = PrometheusServer({}, port=port)  # a client of the running one
        expected = {("model-services", f"http://127.0.0.1:{run.fraud_metrics_port}/metrics"),  # slot 0: the replica
                    ("model-services", f"http://127.0.0.1:{run.fraud_metrics_port + 100}/metrics"),  # free slot
                    ("gateway", f"http://127.0.0.1:{run.admin_port}/stats/prometheus")}
        # Discovery applies the static targets within seconds; first scrapes are spread over the 15 s interval.
        wait_until(lambda: {(t["labels"]["job"], t["scrapeUrl"]) for t in prom.targets()} == expected, 20,
                   f"targets {expected}")
        wait_until(lambda: prom.query('inference_model_ready{model="fraud"} == 1')
                   and prom.query("envoy_server_live == 1"), 40, "the fraud replica and Envoy scraped")
        health = {t["scrapeUrl"]: t["health"] for t in prom.targets()}
        assert health[f"http://127.0.0.1:{run.fraud_metrics_port}/metrics"] == "up"
        assert health[f"http://127.0.0.1:{run.admin_port}/stats/prometheus"] == "up"
        rules = [r["name"] for g in prom.api("rules")["groups"] for r in g["rules"]]
        import yaml

        declared = [r.get("alert") or r.get("record") for g in
                    yaml.safe_load((ROOT / "monitoring" / "alerts.yaml").read_text())["groups"] for r in g["rules"]]
        assert sorted(rules) == sorted(declared) and {"InferenceLatencyP95High", "InferenceErrorRateHigh"} <= set(rules)
    finally:
        assert run.stop() == 0, run.output[-3000:]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2)
