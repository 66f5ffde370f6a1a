"""Every custom resource the overlays render (Argo Rollouts, Gateway API, KEDA, Prometheus Operator, cert-manager)
validates against its CRD's schema, offline: the kubernetes-models packages (npm, pinned in crd-schemas/package.json and
installed by `make tools`) carry each project's CRD schemas as validators. KServe's InferenceService has no such
package: its checks are in test_k8s.py."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from tests.deploy.conftest import run
from tests.support.procs import ROOT

SCHEMAS = ROOT / "tests" / "deploy" / "crd-schemas"
CUSTOM = {"Rollout", "AnalysisTemplate", "HTTPRoute", "ScaledObject", "PodMonitor", "PrometheusRule", "Certificate",
          "Issuer"}


def validate(objects: list[dict]) -> tuple[int, str]:
    node = shutil.which("node")
    if node is None or not (SCHEMAS / "node_modules" / "@kubernetes-models").exists():
        pytest.fail("node or the CRD schema packages are missing: run `make system-deps tools`")
    proc = run([node, str(SCHEMAS / "validate.mjs")], input=json.dumps(objects))
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("overlay", ["dev", "prod", "kserve"])
def test_custom_resources_match_their_crd_schemas(rendered, overlay):
    objects = [o for o in rendered[overlay][1] if o["kind"] in CUSTOM]
    assert objects
    code, out = validate(objects)
    assert code == 0, out
    assert out.count("OK ") == len(objects)


def test_the_schemas_catch_a_bad_route_and_a_bad_scaler(rendered):
    prod = rendered["prod"][1]
    route = copy.deepcopy(next(o for o in prod if o["kind"] == "HTTPRoute"))
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = -5
    scaler = copy.deepcopy(next(o for o in prod if o["kind"] == "ScaledObject"))
    scaler["spec"]["triggers"][0].pop("type")
    code, out = validate([route, scaler])
    assert code == 1
    assert "weight must be >= 0" in out and "INVALID keda.sh/v1alpha1/ScaledObject" in out, out
