"""docker-compose.yml: its structure, and that it runs what `make run` runs (the stack brought up for real under
podman-compose: tests/deploy/test_containers.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from mlplatform_gateway import local as gateway_local
from mlplatform_gateway import render

from tests.support.procs import ROOT

RUN_LOCAL = (ROOT / "scripts" / "run_local.py").read_text()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_the_stack_and_the_observability_profile(compose, services):
    assert set(compose) == {"redis", "gateway", "prometheus", "jaeger", "grafana", *services}
    assert {n for n, s in compose.items() if "observability" in s.get("profiles", [])} == {"prometheus", "jaeger",
                                                                                          "grafana"}
    for name, svc in compose.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"
        assert "healthcheck" in svc, f"{name} has no healthcheck"


def test_model_services_run_the_local_command_with_the_local_settings(compose, services, deploy_cfg):
    drain = re.search(r'DRAIN_DELAY_S", "(\d+)"', RUN_LOCAL).group(1)  # what make run sets
    for name, spec in services.items():
        svc, p = compose[name], spec["env_prefix"]
        build = svc["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).exists()
        assert build["args"] == {"SERVICE": name, "VARIANT": "cpu"}
        assert svc["image"] == f"{deploy_cfg['image_registry']}/{name}:{deploy_cfg['image_tag']}"
        # scripts/run_local.py starts [sys.executable, "-m", svc.module]
        assert '[PY, "-m", svc.module]' in RUN_LOCAL
        assert svc["command"] == ["python", "-m", spec["module"]]
        env = svc["environment"]
        assert env[f"{p}HOST"] == "0.0.0.0"
        assert (int(env[f"{p}GRPC_PORT"]), int(env[f"{p}METRICS_PORT"])) == (spec["grpc_port"], spec["metrics_port"])
        assert env[f"{p}DRAIN_DELAY_S"] == drain
        assert env[f"{p}MODEL_REPOSITORY"] == "/models" and "./model_repository:/models:ro" in svc["volumes"]
        assert sorted(svc["ports"]) == sorted(f"127.0.0.1:{port}:{port}" for port in (spec["grpc_port"],
                                                                                       spec["metrics_port"]))
        assert ("REDIS_URL" in env) == spec["redis"]
        if spec["redis"]:
            assert env["REDIS_URL"] == "redis://redis:6379/0"
            assert svc["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "mlplatform.healthcheck", "--module",
                                              spec["module"]]
        assert svc["read_only"] is True and svc["user"] == "10001:10001" and svc["cap_drop"] == ["ALL"]
        assert svc["stop_grace_period"] == "30s"


def test_gateway_runs_the_local_envoy_command_after_every_service_is_healthy(compose, services):
    gw = compose["gateway"]
    mounted = "/etc/envoy/config/envoy.yaml"
    # Envoy's arguments (the image's entrypoint drains Envoy on SIGTERM, within the grace period); two workers
    # whatever the host's core count
    assert gw["command"] == gateway_local.envoy_command(Path(mounted), concurrency=2, drain_time_s=5)[1:]
    assert gw["stop_grace_period"] == "30s"
    # The config's directory: envoy.yaml and the SDS files that name the certificates (secrets_dir).
    assert f"./build/gateway/compose:{Path(mounted).parent}:ro" in gw["volumes"]
    assert render.load_values("compose")["secrets_dir"] == str(Path(mounted).parent)
    # TLS by default: the dev certificate where the compose variant reads it.
    tls_dir = render.load_values("compose")["tls"]
    assert tls_dir["enabled"] is True and f"./.dev/gateway/tls:{tls_dir['dir']}:ro" in gw["volumes"]
    assert gw["depends_on"] == {name: {"condition": "service_healthy"} for name in services}
    assert "127.0.0.1:8080:8080" in gw["ports"]  # GATEWAY_PORT's default in make run
    assert '"GATEWAY_PORT", "8080"' in RUN_LOCAL
    assert gw["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "mlplatform_gateway"]


def test_compose_gateway_config_reaches_services_by_their_compose_names(compose, tmp_path):
    cfg = yaml.safe_load(render.render("compose", {"files_dir": str(tmp_path)}))
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] in compose:
            sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
                "socket_address"]
            env = compose[cluster["name"]]["environment"]
            port = next(v for k, v in env.items() if k.endswith("_GRPC_PORT"))
            assert (sock["address"], sock["port_value"]) == (cluster["name"], int(port))


def test_prometheus_loads_the_shared_rules_and_scrapes_every_service(compose, services):
    prom = compose["prometheus"]
    assert "./monitoring/alerts.yaml:/etc/prometheus/alerts.yaml:ro" in prom["volumes"]
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yaml"]
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{n}:{s['metrics_port']}" for n, s in services.items()} | {"gateway:9902"}
    assert compose["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_redis_image_is_replaceable_and_reachable_from_the_other_containers(compose):
    """REDIS_IMAGE swaps the image (make images builds a Debian one where no registry can be reached); the
    command turns protected mode off itself, as the official image does, so any Redis build serves the stack."""
    redis = compose["redis"]
    assert redis["image"] == "${REDIS_IMAGE:-redis:7.4.2-alpine3.21}"
    cmd = redis["command"]
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--bind") + 1] == "0.0.0.0" and cmd[cmd.index("--protected-mode") + 1] == "no"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
