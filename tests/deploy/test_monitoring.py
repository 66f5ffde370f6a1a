"""The alert rules and the canary analysis queries, evaluated by promtool on synthetic series."""

from __future__ import annotations

import pytest
import yaml

from deploy import generate
from tests.deploy.conftest import run, tool
from tests.support.procs import ROOT


def test_rules_and_local_prometheus_config_are_valid():
    rules = run([tool("promtool"), "check", "rules", "monitoring/alerts.yaml"])
    groups = yaml.safe_load((ROOT / "monitoring" / "alerts.yaml").read_text())["groups"]
    found = f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found"
    assert rules.returncode == 0 and found in rules.stdout, rules.stdout + rules.stderr
    config = run([tool("promtool"), "check", "config", "monitoring/prometheus.yml"])
    assert config.returncode == 0, config.stdout + config.stderr


def test_rule_unit_tests_pass():
    """monitoring/alerts.test.yaml: errors, latency, queue saturation and backlog, firing and not."""
    proc = run([tool("promtool"), "test", "rules", "monitoring/alerts.test.yaml"])
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_a_broken_expectation_fails(tmp_path):
    tests = yaml.safe_load((ROOT / "monitoring" / "alerts.test.yaml").read_text())
    tests["rule_files"] = [str(ROOT / "monitoring" / "alerts.yaml")]
    tests["tests"][0]["alert_rule_test"][1]["exp_alerts"] = []  # fraud's 0.2 % errors do fire
    path = tmp_path / "broken.test.yaml"
    path.write_text(yaml.safe_dump(tests))
    proc = run([tool("promtool"), "test", "rules", str(path)])
    assert proc.returncode != 0 and "InferenceErrorRateHigh" in proc.stdout + proc.stderr


def _series(h: str, ok: int, errors: int, buckets: dict[str, int] | None = None) -> list[dict]:
    labels = f'namespace="mlplatform",model="fraud",version="1",method="Predict",rollouts_pod_template_hash="{h}"'
    series = [{"series": f'inference_requests_total{{{labels},status="OK"}}', "values": f"0+{ok}x20"},
              {"series": f'inference_requests_total{{{labels},status="INTERNAL"}}', "values": f"0+{errors}x20"}]
    for le, step in (buckets or {}).items():
        series.append({"series": f'inference_request_duration_seconds_bucket{{{labels},le="{le}"}}',
                       "values": f"0+{step}x20"})
    if buckets:
        series.append({"series": f"inference_request_duration_seconds_count{{{labels}}}",
                       "values": f"0+{buckets['+Inf']}x20"})
    return series


FAST = {"0.05": 100, "+Inf": 100}
SLOW = {"0.05": 10, "0.1": 50, "0.2": 100, "+Inf": 100}  # p95 = 0.1 + 0.1 * 45/50 = 190 ms


@pytest.mark.parametrize(("case", "canary", "stable", "error_fails", "latency_fails"), [
    ("canary 0.5 % errors, stable clean", (995, 5, FAST), (1000, 0, FAST), True, False),
    ("canary 0.05 % errors: under 0.1 %", (1999, 1, FAST), (1000, 0, FAST), False, False),
    ("canary 2 % errors, stable worse (3 %)", (98, 2, FAST), (97, 3, FAST), False, False),
    ("canary 4 % errors, stable 3 %", (96, 4, FAST), (97, 3, FAST), True, False),
    ("canary slow: p95 190 ms", (1000, 0, SLOW), (1000, 0, FAST), False, True),
    ("no canary traffic yet", (0, 0, {}), (1000, 0, FAST), None, None),
    ("no traffic at all", (0, 0, {}), (0, 0, {}), None, None),
    # 20 requests in 5 min, 1 in 4 an error, all slow: too few to judge either way.
    ("low-traffic canary: 4 requests a minute", (3, 1, {"0.2": 3, "+Inf": 4}), (1000, 0, FAST), None, None),
    # 100 in 5 min, the minimum: judged.
    ("canary at the minimum sample, 5 % errors", (19, 1, FAST), (1000, 0, FAST), True, False),
])
def test_canary_analysis_queries(tmp_path, case, canary, stable, error_fails, latency_fails):
    """The AnalysisTemplate's PromQL with Argo's args filled in: with at least the minimum of canary requests in
    the 5-minute window (100), the error metric is > 0 (its failureCondition) exactly when the canary does worse
    than max(stable, 0.1 %), the latency metric > 0.1 s exactly when the canary's p95 is over 100 ms; with
    fewer, both return no sample (None here): neither condition holds and Argo counts the measurement
    Inconclusive instead of failing a canary on one error among a handful of requests."""
    queries = {k: q.replace("{{args.canary-hash}}", "canary").replace("{{args.stable-hash}}", "stable")
               for k, q in generate.analysis_queries(generate.load_services(), "fraud").items()}
    template = generate.analysis_template(generate.load_services(), "fraud")
    judged = "len(result) > 0 && !isNaN(result[0])"
    assert {m["name"]: (m["successCondition"], m["failureCondition"], m["inconclusiveLimit"])
            for m in template["spec"]["metrics"]} == {
        "error-rate": (f"{judged} && result[0] <= 0", f"{judged} && result[0] > 0", 30),
        "p95-latency": (f"{judged} && result[0] <= 0.1", f"{judged} && result[0] > 0.1", 30)}
    series = _series("canary", *canary) + _series("stable", *stable)
    error, latency = queries["error-rate"], queries["p95-latency"]
    if error_fails is None:
        expr_tests = [{"expr": error, "eval_time": "10m", "exp_samples": []},
                      {"expr": latency, "eval_time": "10m", "exp_samples": []}]
    else:
        expr_tests = [{"expr": f"({error}) > bool 0", "eval_time": "10m",
                       "exp_samples": [{"labels": "{}", "value": int(error_fails)}]},
                      # always a number when judged (NaN would pass neither condition)
                      {"expr": f"({error}) == bool ({error})", "eval_time": "10m",
                       "exp_samples": [{"labels": "{}", "value": 1}]},
                      {"expr": f"({latency}) > bool 0.1", "eval_time": "10m",
                       "exp_samples": [{"labels": "{}", "value": int(latency_fails)}]}]
    path = tmp_path / "analysis.test.yaml"
    path.write_text(yaml.safe_dump({"tests": [{"interval": "1m", "input_series": series,
                                               "promql_expr_test": expr_tests}]}))
    proc = run([tool("promtool"), "test", "rules", str(path)])
    assert proc.returncode == 0, f"{case}:\n{proc.stdout}{proc.stderr}"
