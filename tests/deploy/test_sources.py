"""deploy/services.yaml is the one service list: the local run, the gateway and the sources agree with it.

Until every service branch is merged, the local run and the gateway list a subset; the checks
below compare what they list. `test_every_service_has_its_source` fails for a service whose
package is not in the tree yet.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import yaml

from tests.support.procs import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import run_local


def test_the_services_with_the_shared_conventions(services):
    assert {n: (s["env_prefix"], s["grpc_port"], s["metrics_port"]) for n, s in services.items()} == {
        "fraud": ("FRAUD_", 50051, 9101), "cnn": ("CNN_", 50052, 9102), "sentiment": ("SENTIMENT_", 50053, 9103),
        "generic": ("GENERIC_", 50054, 9104)}
    assert {n for n, s in services.items() if s["gpu"]} == {"cnn", "sentiment"}
    assert {n for n, s in services.items() if s["redis"]} == {"fraud"}
    for name, svc in services.items():
        assert svc["module"] == f"{name}_service"
        typed = svc["grpc_service"].startswith(f"{name}.v1.")
        assert typed == ("build" in svc), f"{name}: a typed service builds its model, the generic one lists models"
    assert services["generic"]["grpc_service"] == "inference.GRPCInferenceService"
    assert services["generic"]["models"] == ["diabetes"]


@pytest.mark.parametrize("name", ["fraud", "cnn", "sentiment", "generic"])
def test_every_service_has_its_source(services, name):
    svc = services[name]
    package = ROOT / "services" / name / "src" / svc["module"]
    assert (package / "__main__.py").exists(), f"{package} is missing (not merged yet?)"
    assert (package / "settings.py").exists()
    assert importlib.util.find_spec(svc["module"]) is not None, f"{svc['module']} is not installed"


def test_local_run_uses_the_same_modules_prefixes_and_ports(services):
    assert run_local.SERVICES, "run_local lists no service"
    for svc in run_local.SERVICES:
        assert svc.name in services, f"run_local starts {svc.name}, which deploy/services.yaml does not list"
        expected = services[svc.name]
        assert (svc.module, svc.env_prefix, svc.grpc_port, svc.metrics_port) == (
            expected["module"], expected["env_prefix"], expected["grpc_port"], expected["metrics_port"])


def test_gateway_routes_the_same_services_on_the_same_ports(services):
    gateway = yaml.safe_load((ROOT / "gateway-envoy" / "src" / "mlplatform_gateway" / "services.yaml").read_text())
    for name, entry in gateway["services"].items():
        assert name in services, f"the gateway routes {name}, which deploy/services.yaml does not list"
        assert (entry["grpc_service"], entry["port"]) == (services[name]["grpc_service"],
                                                          services[name]["grpc_port"])


def test_run_local_and_gateway_list_every_deployed_service(services):
    """After the merge all three are started locally and routed by the gateway."""
    gateway = yaml.safe_load((ROOT / "gateway-envoy" / "src" / "mlplatform_gateway" / "services.yaml").read_text())
    assert {s.name for s in run_local.SERVICES} == set(services)
    assert set(gateway["services"]) == set(services)
