"""The prod canary's weights are real: Argo Rollouts' Gateway API plugin sets them on each service's HTTPRoute, the
gateway's route-sync sidecar turns the route into Envoy's routes. Offline: the step math, the rendered objects, and
the routes the gateway would serve at every step (the wire test: tests/gateway/test_route_sync.py)."""

from __future__ import annotations

import copy

import pytest
import yaml
from mlplatform_gateway import render, routesync

from deploy import canary_plan, generate
from tests.deploy.conftest import by_kind, run, tool
from tests.support import gateway_api
from tests.support.procs import ROOT

STEPS = canary_plan.STEPS


# --- step math ---------------------------------------------------------------------------------

@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 7, 10, 40])
def test_every_step_keeps_the_stable_set_whole_and_the_canary_sized_to_its_share(replicas):
    states = canary_plan.plan(STEPS, replicas)
    weights = [s.weight for s in states]
    assert weights == sorted(weights) and weights[-1] == 100  # only forward, ending on the whole traffic
    for s in states:
        assert s.stable_pods == replicas, s  # no dynamicStableScale: the stable set stays until promotion
        assert s.canary_pods * 100 >= s.weight * replicas, s  # never more calls than its pods' share
        assert s.canary_pods <= replicas, s
        if s.tester_route:
            assert s.canary_pods >= 1, s  # testers reach a running canary
    first = canary_plan.first_traffic_step(STEPS)
    assert states[first].weight > 0 and all(s.weight == 0 for s in states[:first])
    assert states[first - 1].tester_route  # testers before any client


def test_step_math_for_four_replicas():
    got = [(s.weight, s.canary_pods, s.stable_pods, s.tester_route) for s in canary_plan.plan(STEPS, 4)]
    assert got == [
        (0, 1, 4, False),   # setCanaryScale replicas 1
        (0, 1, 4, True),    # setHeaderRoute canary-testers
        (0, 1, 4, True),    # pause 15m
        (0, 1, 4, True),    # setCanaryScale weight 5: ceil(0.2)
        (5, 1, 4, True),    # setWeight 5
        (5, 1, 4, True),    # matchTrafficWeight
        (5, 1, 4, True),    # pause 1h
        (25, 1, 4, True), (25, 1, 4, True),
        (50, 2, 4, True), (50, 2, 4, True),
        (100, 4, 4, True),
    ]
    assert canary_plan.first_traffic_step(STEPS) == 4


def test_plan_follows_argo_scale_rules():
    steps = [{"setWeight": 10}, {"setCanaryScale": {"replicas": 3}}, {"setWeight": 20},
             {"setCanaryScale": {"weight": 50}}, {"setCanaryScale": {"matchTrafficWeight": True}},
             {"setHeaderRoute": {"name": canary_plan.TESTER_ROUTE, "match": [{"headerName": "x"}]}},
             {"setHeaderRoute": {"name": canary_plan.TESTER_ROUTE}}]
    assert [(s.weight, s.canary_pods, s.tester_route) for s in canary_plan.plan(steps, 10)] == [
        (10, 1, False), (10, 3, False), (20, 3, False), (20, 5, False), (20, 2, False), (20, 2, True),
        (20, 2, False)]


# --- rendered objects ---------------------------------------------------------------------------

def test_rollouts_drive_their_httproute_through_the_gateway_api_plugin(rendered, services):
    objects = rendered["prod"][1]
    routes, k8s_services = by_kind(objects, "HTTPRoute"), by_kind(objects, "Service")
    gateway = render.load_values("k8s", generate.PROD_GATEWAY)["canary"]
    for name, rollout in by_kind(objects, "Rollout").items():
        canary = rollout["spec"]["strategy"]["canary"]
        plugin = canary["trafficRouting"]["plugins"][generate.GATEWAY_API_PLUGIN]
        assert plugin == {"httpRoute": name, "namespace": "mlplatform"}
        assert "dynamicStableScale" not in canary
        assert canary["steps"] == STEPS
        assert canary["analysis"]["startingStep"] == canary_plan.first_traffic_step(STEPS)
        managed = {r["name"] for r in canary["trafficRouting"]["managedRoutes"]}
        header_steps = [s["setHeaderRoute"] for s in canary["steps"] if "setHeaderRoute" in s]
        assert header_steps and {s["name"] for s in header_steps} <= managed
        # The testers' header is the one the gateway sets from the verified claim (and drops from clients).
        assert header_steps[0]["match"] == [{"headerName": gateway["header"], "headerValue": {"exact": "true"}}]
        route = routes[plugin["httpRoute"]]
        (rule,) = route["spec"]["rules"]
        refs = {r["name"]: r for r in rule["backendRefs"]}
        assert set(refs) == {canary["stableService"], canary["canaryService"]} and set(refs) <= set(k8s_services)
        port = services[name]["grpc_port"]
        assert {r["port"] for r in refs.values()} == {port}
        assert (refs[canary["stableService"]]["weight"], refs[canary["canaryService"]]["weight"]) == (100, 0)
        grpc_service = render.load_services()[name]["grpc_service"]
        assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": f"/{grpc_service}"}}]


def test_prod_gateway_runs_route_sync_beside_envoy(rendered):
    objects = rendered["prod"][1]
    pod = by_kind(objects, "Deployment")["gateway"]["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["name"] == "route-sync" and sidecar["restartPolicy"] == "Always"  # native sidecar: first, always
    cmd = sidecar["command"]
    assert cmd[:4] == ["python", "-m", "mlplatform_gateway", "route-sync"]
    assert cmd[cmd.index("--out") + 1] == generate.ROUTES_FILE
    assert cmd[cmd.index("--values") + 1] == "/etc/envoy/config/values.yaml"
    assert sidecar["startupProbe"]["exec"]["command"] == ["test", "-s", generate.ROUTES_FILE]
    envoy = next(c for c in pod["containers"] if c["name"] == "gateway")
    routes_dir = generate.ROUTES_FILE.rsplit("/", 1)[0]
    assert {"name": "routes", "mountPath": routes_dir, "readOnly": True} in envoy["volumeMounts"]
    # Only the sidecar holds an API token, and it may only read HTTPRoutes.
    assert pod["automountServiceAccountToken"] is False
    token_mounts = [c["name"] for c in [*pod["initContainers"], *pod["containers"]]
                    for m in c.get("volumeMounts", []) if m["name"] == "route-sync-token"]
    assert token_mounts == ["route-sync"]
    (role,) = by_kind(objects, "Role").values()
    assert role["rules"] == [{"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"],
                              "verbs": ["get", "list", "watch"]}]
    (binding,) = by_kind(objects, "RoleBinding").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": "mlplatform"}]
    # The ConfigMap carries the values route-sync renders with; Envoy reads its routes from that file. (The
    # prod overlay's values, with upstreams.tls from the mtls component the overlay includes.)
    cm = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"]
    data = by_kind(objects, "ConfigMap")[cm]["data"]
    assert yaml.safe_load(data["values.yaml"]) == generate.PROD_MTLS_GATEWAY
    hcm = yaml.safe_load(data["envoy.yaml"])["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert hcm["typed_config"]["rds"]["config_source"]["path_config_source"]["path"] == generate.ROUTES_FILE


def test_dev_and_kserve_have_no_route_sync(rendered):
    for overlay in ("dev", "kserve"):
        objects = rendered[overlay][1]
        pod = by_kind(objects, "Deployment")["gateway"]["spec"]["template"]["spec"]
        assert "initContainers" not in pod and not by_kind(objects, "HTTPRoute")


def test_the_gateway_serves_each_steps_weight(rendered, tmp_path):
    """Replay the plugin's edits to fraud's HTTPRoute step by step; at each, route-sync's routes send exactly the
    step's weight to the canary and route testers to it exactly while the tester route is set."""
    objects = rendered["prod"][1]
    rollout = by_kind(objects, "Rollout")["fraud"]["spec"]["strategy"]["canary"]
    route = copy.deepcopy(by_kind(objects, "HTTPRoute")["fraud"])
    stable, canary = rollout["stableService"], rollout["canaryService"]
    sync = routesync.RouteSync(lambda: {"fraud": route}, tmp_path / "routes.yaml", overrides=generate.PROD_MTLS_GATEWAY)
    for i, state in enumerate(canary_plan.plan(STEPS, 4)):
        route = gateway_api.after_steps(route, stable, canary, STEPS[i:i + 1])
        sync.step()
        table = yaml.safe_load((tmp_path / "routes.yaml").read_text())["resources"][0]
        fraud = [r for r in table["virtual_hosts"][0]["routes"]
                 if r["match"].get("prefix", r["match"].get("path", "")).startswith("/fraud.v1.FraudService/")]
        unmarked = next(r for r in fraud if r["match"] == {"prefix": "/fraud.v1.FraudService/"})
        testers = [r for r in fraud if "headers" in r["match"]]
        if 0 < state.weight < 100:
            assert unmarked["route"]["weighted_clusters"]["clusters"] == [
                {"name": "fraud", "weight": 100 - state.weight}, {"name": "fraud_canary", "weight": state.weight}]
        else:
            assert unmarked["route"]["cluster"] == ("fraud_canary" if state.weight == 100 else "fraud")
        assert bool(testers) == state.tester_route, i
        assert all(r["route"]["cluster"] == "fraud_canary" for r in testers)
        other = [r for r in table["virtual_hosts"][0]["routes"] if r["match"] == {"prefix": "/cnn.v1.CnnService/"}]
        assert other[0]["route"]["cluster"] == "cnn"  # the other services are untouched
    # Promotion: the plugin sets the weight back to 0 and drops the header rules.
    route = gateway_api.after_steps(route, stable, canary, [{"setWeight": 0},
                                                            {"setHeaderRoute": {"name": canary_plan.TESTER_ROUTE}}])
    sync.step()
    assert sync.state["fraud"].weight_percent == 0 and not sync.state["fraud"].testers


def test_cluster_setup_registers_the_plugin_argo_uses():
    proc = run([tool("kubectl"), "kustomize", str(ROOT / "k8s" / "cluster" / "argo-rollouts")])
    assert proc.returncode == 0, proc.stderr
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(proc.stdout)}
    config = objects[("ConfigMap", "argo-rollouts-config")]
    assert config["metadata"]["namespace"] == "argo-rollouts"
    (plugin,) = yaml.safe_load(config["data"]["trafficRouterPlugins"])
    assert plugin["name"] == generate.GATEWAY_API_PLUGIN
    assert generate.GATEWAY_API_PLUGIN_VERSION in plugin["location"]
    role = objects[("ClusterRole", "argo-rollouts-gateway-api-plugin")]
    assert {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"],
            "verbs": ["get", "list", "update", "patch"]} in role["rules"]
    assert objects[("ClusterRoleBinding", "argo-rollouts-gateway-api-plugin")]["subjects"][0]["name"] == "argo-rollouts"
