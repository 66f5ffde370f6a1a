"""Generated files are current, and the gateway configs under k8s/ are ones Envoy accepts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from mlplatform_gateway import auth, render, routesync, tls
from mlplatform_gateway.local import prepare_files_dir

from deploy import generate
from tests.support.procs import ROOT

GATEWAY_CONFIGS = ["k8s/base/platform/gateway/envoy.yaml", "k8s/overlays/prod/gateway/envoy.yaml",
                   "k8s/overlays/kserve/gateway/envoy.yaml", "k8s/components/mtls/gateway/envoy.yaml"]


def test_committed_files_match_a_fresh_generation():
    """Fails when deploy/services.yaml, the gateway template/variants or alerts.yaml changed without
    `make k8s-manifests` (or when a generated file was edited by hand)."""
    stale = [str(p.relative_to(ROOT)) for p, text in generate.outputs().items()
             if not p.exists() or p.read_text() != text]
    assert not stale, f"run `make k8s-manifests`: stale {stale}"


def test_check_mode_names_a_stale_file(tmp_path, monkeypatch, capsys):
    fake_root = tmp_path / "k8s"
    monkeypatch.setattr(generate, "K8S", fake_root)
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    (tmp_path / "docker").mkdir()
    assert generate.main([]) == 0  # writes into the fake tree
    target = fake_root / "base" / "services" / "fraud.yaml"
    target.write_text(target.read_text().replace("minReplicaCount: 3", "minReplicaCount: 4"))
    assert generate.main(["--check"]) == 1
    assert "k8s/base/services/fraud.yaml" in capsys.readouterr().err


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gateway-files")
    tls.ensure_dev_tls(d)  # /etc/envoy/tls (the gateway-tls Secret) -> <files_dir>/tls
    # /etc/envoy/upstream-tls (the gateway-upstream-tls Secret of the mtls component) -> <files_dir>/upstream-tls
    client = tls.ensure_dev_mtls(d / "keys", list(render.load_services())).gateway
    assert generate.GATEWAY_UPSTREAM_TLS_DIR == "/etc/envoy/upstream-tls"
    shutil.copytree(client.directory, d / "upstream-tls")
    return prepare_files_dir(d, auth.ensure_dev_keys(d / "keys").jwks_path)


@pytest.mark.parametrize("relpath", GATEWAY_CONFIGS)
def test_committed_gateway_configs_are_accepted_by_envoy(relpath, files_dir, tmp_path):
    """`envoy --mode validate` on the file the ConfigMap carries (its /etc/envoy paths pointed at local copies)."""
    text = (ROOT / relpath).read_text()
    assert '"/etc/envoy/descriptors.pb"' in text
    text = text.replace('"/etc/envoy/', f'"{files_dir}/')
    if generate.ROUTES_FILE in text:
        # The prod gateway reads its routes from the file its route-sync sidecar writes before Envoy starts
        # (with the values the ConfigMap carries beside envoy.yaml): write it the same way here.
        routes = tmp_path / "routes" / "routes.yaml"
        values = yaml.safe_load((ROOT / relpath).with_name("values.yaml").read_text())
        assert routesync.RouteSync(lambda: {}, routes, overrides=values).step()
        assert yaml.safe_load(routes.read_text())["resources"][0]["name"] == "gateway"
        text = text.replace(f'"{generate.ROUTES_FILE}"', f'"{routes}"').replace(
            f'"{Path(generate.ROUTES_FILE).parent}"', f'"{routes.parent}"')
    # The SDS files beside it in the ConfigMap (the base's listener certificate, the mtls component's client
    # certificate and CA), with their paths pointed at the same local copies.
    (files_dir / "config").mkdir(exist_ok=True)
    for sds in ROOT.glob("k8s/**/gateway/sds-*.yaml"):
        (files_dir / "config" / sds.name).write_text(sds.read_text().replace(" /etc/envoy/", f" {files_dir}/"))
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    render.validate(path)


def test_prod_gateway_verifies_tokens_against_the_remote_jwks():
    providers = lambda cfg: yaml.safe_load(cfg)["static_resources"]["listeners"][0][  # noqa: E731
        "filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][2]["typed_config"]["providers"]
    prod = providers((ROOT / GATEWAY_CONFIGS[1]).read_text())["mlplatform"]
    assert prod["remote_jwks"]["http_uri"]["uri"] == "https://login.mlplatform.example.com/.well-known/jwks.json"
    assert prod["issuer"] == "https://login.mlplatform.example.com/"
    assert "local_jwks" not in prod


def test_kserve_gateway_routes_to_the_predictors_without_its_own_canary(services):
    cfg = yaml.safe_load((ROOT / GATEWAY_CONFIGS[2]).read_text())
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    for name in clusters.keys() & services.keys():
        ep = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert ep["socket_address"] == {"address": f"{name}-predictor.mlplatform.svc.cluster.local", "port_value": 80}
        # Knative routes by Host: health checks and requests carry the predictor's name, not the client's host.
        (check,) = clusters[name]["health_checks"]
        assert check["grpc_health_check"]["authority"] == f"{name}-predictor.mlplatform.svc.cluster.local"
    assert not any(n.endswith("_canary") for n in clusters)
    routes = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"]
    to_predictors = [r["route"] for r in routes if r.get("route", {}).get("cluster") in services]
    assert to_predictors and all(r["auto_host_rewrite"] is True for r in to_predictors)


def test_ratelimit_service_config_holds_the_gateway_tiers():
    """envoyproxy/ratelimit gets the same numbers as the local limit: 100/min per key (standard), the
    other tiers per key, and one bucket per unlisted tier."""
    config = yaml.safe_load((ROOT / "k8s/base/platform/ratelimit/config.yaml").read_text())
    values = render.load_values("k8s")
    assert config["domain"] == values["rate_limit"]["global_service"]["domain"]
    per_key = {d["value"]: d["descriptors"][0]["rate_limit"] for d in config["descriptors"] if "value" in d}
    assert per_key["standard"] == {"unit": "minute", "requests_per_unit": 100}
    assert {t: r["requests_per_unit"] for t, r in per_key.items()} == render.tiers(values)
    assert all(d["descriptors"][0]["key"] == "api_key" for d in config["descriptors"] if "value" in d)
    wildcard = [d for d in config["descriptors"] if "value" not in d]
    assert wildcard == [{"key": "tier", "rate_limit": {"unit": "minute", "requests_per_unit": 100}}]


def test_prometheus_rule_is_the_local_rules_file():
    rule = yaml.safe_load((ROOT / "k8s/base/platform/prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load((ROOT / "monitoring/alerts.yaml").read_text())["groups"]


def test_k8s_gateway_traces_to_the_services_collector(deploy_cfg, monkeypatch):
    """The rendered file must not depend on the renderer's environment."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://elsewhere:4317")
    cfg = yaml.safe_load(render.render("k8s"))
    collector = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "otel_collector")
    sock = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert f"http://{sock['address']}:{sock['port_value']}" == deploy_cfg["otlp_endpoint"]
