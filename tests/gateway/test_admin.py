"""The gateway's Prometheus metrics (admin `/stats/prometheus`, loopback only) count what it did."""

from __future__ import annotations

import re

import pytest

from tests.gateway.helpers import post

pytestmark = pytest.mark.integration


def scrape(gateway) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    samples = {}
    for line in gateway.admin("/stats/prometheus").splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            samples[m.group(1)] = float(m.group(2))
    return samples


def test_prometheus_stats_count_auth_decisions_and_upstream_calls(gateway, token, fraud_features):
    before = scrape(gateway)
    body = {"transaction": {"transaction_id": "stats", "features": fraud_features[0]}}
    assert post(gateway, "/api/v1/fraud", body).status == 401
    for _ in range(3):
        assert post(gateway, "/api/v1/fraud", body, token=token("stats-user")).status == 200
    after = scrape(gateway)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    prefix = '{envoy_http_conn_manager_prefix="gateway"}'
    assert delta(f"envoy_http_jwt_authn_denied{prefix}") == 1
    assert delta(f"envoy_http_jwt_authn_allowed{prefix}") == 3
    assert delta('envoy_cluster_upstream_rq_completed{envoy_cluster_name="fraud"}') == 3
    assert after['envoy_cluster_membership_healthy{envoy_cluster_name="fraud"}'] == 1
    assert after['envoy_cluster_health_check_success{envoy_cluster_name="fraud"}'] > 0
    assert delta('envoy_http_local_rate_limit_ok{envoy_local_http_ratelimit_prefix="api_key_rate_limit"}') == 3

