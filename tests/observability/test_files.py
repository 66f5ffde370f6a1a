"""The observability files hang together: the Grafana dashboard, its provisioning and the compose profile that
mounts them; the rules scaled for the alert test stay valid for promtool and equal the file's in all but time."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.observability.rules import scale_expr, scaled_rules, seconds
from tests.support.procs import ROOT

GRAFANA = ROOT / "monitoring" / "grafana"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "mlplatform.json").read_text())


def test_dashboard_panels_use_the_provisioned_datasource_and_do_not_overlap(dashboard):
    [source] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["isDefault"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in panels
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)) and all(x < 24 for x, _ in cells)  # Grafana's grid is 24 wide
    for p in panels:
        assert p["datasource"]["uid"] == source["uid"] and p["targets"], p["title"]
        assert all(t["datasource"]["uid"] == source["uid"] and t["expr"] for t in p["targets"]), p["title"]
    assert dashboard["templating"]["list"][0]["datasource"]["uid"] == source["uid"]


def test_compose_grafana_provisions_the_dashboard_from_prometheus(dashboard):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    grafana = compose["grafana"]
    assert grafana["profiles"] == ["observability"] and grafana["depends_on"] == {
        "prometheus": {"condition": "service_healthy"}}
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert mounts == {"./monitoring/grafana/provisioning": "/etc/grafana/provisioning",
                      "./monitoring/grafana/dashboards": "/etc/grafana/dashboards"}
    [provider] = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mlplatform.yaml").read_text())["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / home.replace("/etc/grafana/dashboards", "monitoring/grafana/dashboards")).is_file()
    assert "127.0.0.1:9090:9090" in compose["prometheus"]["ports"] and "127.0.0.1:3000:3000" in grafana["ports"]
    assert compose["jaeger"]["profiles"] == ["observability"] and "127.0.0.1:4317:4317" in compose["jaeger"]["ports"]


def test_scaled_rules_change_only_durations():
    rules = scaled_rules(ROOT / "monitoring" / "alerts.yaml", 30)
    by_name = {r.get("alert") or r["record"]: r for g in rules["groups"] for r in g["rules"]}
    assert by_name["InferenceLatencyP95High"]["for"] == "10s" and by_name["InferenceQueueBacklog"]["for"] == "20s"
    assert "[10s]" in by_name["model:inference_requests:rate5m"]["expr"]
    assert rules["groups"][0]["interval"] == "1s"
    assert scale_expr("rate(x[1h30m]) + max_over_time(y[5m:1m])", 30) == "rate(x[180s]) + max_over_time(y[10s:2s])"
    assert seconds("1500ms") == 1.5
    with pytest.raises(ValueError):
        seconds("5 minutes")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool: make system-deps")
def test_scaled_rules_are_valid_for_promtool(tmp_path):
    path = tmp_path / "alerts.yaml"
    path.write_text(yaml.safe_dump(scaled_rules(ROOT / "monitoring" / "alerts.yaml", 30)))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    found = f"SUCCESS: {sum(len(g['rules']) for g in yaml.safe_load(path.read_text())['groups'])} rules found"
    assert proc.returncode == 0 and found in proc.stdout, proc.stdout + proc.stderr


PODMAN_COMPOSE = ROOT / ".venv-tools" / "bin" / "podman-compose"


@pytest.mark.skipif(not PODMAN_COMPOSE.exists(), reason="podman-compose: make tools")
def test_compose_resolves_the_observability_profile():
    """podman-compose parses the file with the profile on: Prometheus, Grafana and Jaeger with their mounts."""
    proc = subprocess.run([str(PODMAN_COMPOSE), "--profile", "observability", "config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert {"prometheus", "grafana", "jaeger"} <= set(services)
    assert "./monitoring/grafana/dashboards:/etc/grafana/dashboards:ro" in services["grafana"]["volumes"]
