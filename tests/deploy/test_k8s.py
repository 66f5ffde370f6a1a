"""Every overlay renders with kustomize, validates against the Kubernetes schemas, follows the policies,
and its custom resources carry what their controllers need."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from mlplatform_gateway.local import envoy_command

from deploy import generate
from tests.deploy.conftest import KUBERNETES_VERSION, OVERLAYS, by_kind, run, tool
from tests.support.procs import ROOT

BUILT_IN_GROUPS = ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1", "autoscaling/v2",
                   "rbac.authorization.k8s.io/v1")
CUSTOM_KINDS = {"Rollout", "AnalysisTemplate", "ScaledObject", "PodMonitor", "PrometheusRule", "InferenceService",
                "HTTPRoute", "Certificate", "Issuer"}
METRICS_SOURCE = (ROOT / "libs" / "src" / "mlplatform" / "metrics.py").read_text()


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    """name -> pod spec, for Deployments and KServe predictors."""
    pods = {f"Deployment/{n}": d["spec"]["template"]["spec"] for n, d in by_kind(objects, "Deployment").items()}
    pods.update({f"InferenceService/{n}": d["spec"]["predictor"]
                 for n, d in by_kind(objects, "InferenceService").items()})
    return pods


def test_every_overlay_renders_only_known_kinds(rendered):
    for overlay, (_, objects) in rendered.items():
        kinds = {o["kind"] for o in objects}
        unknown = {k for k in kinds if k not in CUSTOM_KINDS} - {
            "Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
            "NetworkPolicy", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "Role", "RoleBinding"}
        assert not unknown, f"{overlay}: {unknown}"
        assert all(o["metadata"].get("namespace") == "mlplatform" for o in objects if o["kind"] != "Namespace")


def test_built_in_objects_validate_strictly(rendered, tmp_path):
    """kubernetes-validate --strict (unknown fields rejected) for Kubernetes 1.32."""
    files = []
    for overlay, (_, objects) in rendered.items():
        builtin = [o for o in objects if o["apiVersion"] in BUILT_IN_GROUPS]
        assert len(builtin) >= 20
        path = tmp_path / f"{overlay}-builtin.yaml"
        path.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
        files.append(str(path))
    proc = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, *files])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout and "INVALID" not in proc.stdout


def test_strict_validation_catches_a_misspelt_field(rendered, tmp_path):
    deployment = next(o for o in rendered["dev"][1] if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    proc = run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)])
    assert proc.returncode != 0 and "readinesProbe" in proc.stdout + proc.stderr


# --- policies -------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_probes_and_a_locked_down_security_context(rendered, overlay):
    for pod_name, pod in pod_specs(rendered[overlay][1]).items():
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, pod_name
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", pod_name
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            where = f"{overlay} {pod_name}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where}: {kind}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] >= 10000, where
            assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is False, where
            assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"], where
        for c in pod["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{overlay} {pod_name}/{c['name']}: no {probe}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_never_latest(rendered, overlay):
    for pod_name, pod in pod_specs(rendered[overlay][1]).items():
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and "/" not in tag and tag != "latest", f"{pod_name}: {image}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_workloads_only_on_gpu_nodes(rendered, overlay, services):
    for pod_name, pod in pod_specs(rendered[overlay][1]).items():
        gpus = any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in pod["containers"])
        on_gpu_pool = pod.get("nodeSelector", {}).get("mlplatform.io/pool") == "gpu"
        tolerates = any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        assert gpus == on_gpu_pool == tolerates, f"{overlay} {pod_name}: gpu={gpus} pool={on_gpu_pool}"
        if gpus:
            assert all(c["image"].endswith("-gpu") for c in pod["containers"]), pod_name
    pods = pod_specs(rendered[overlay][1])
    gpu_pods = {p.split("/")[1] for p, spec in pods.items()
                if spec.get("nodeSelector", {}).get("mlplatform.io/pool") == "gpu"}
    expected = set() if overlay == "dev" else {n for n, s in services.items() if s["gpu"]}
    assert gpu_pods == expected


def test_prod_fraud_has_guaranteed_qos(rendered):
    pod = by_kind(rendered["prod"][1], "Deployment")["fraud"]["spec"]["template"]["spec"]
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
    assert pod["nodeSelector"] == {"mlplatform.io/pool": "cpu"}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_model_services_probe_drain_and_stop_in_order(rendered, overlay, services):
    objects = rendered[overlay][1]
    deployments, config_maps = by_kind(objects, "Deployment"), by_kind(objects, "ConfigMap")
    for name, svc in services.items():
        pod = deployments[name]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        p = svc["env_prefix"]
        assert c["command"] == ["python", "-m", svc["module"]]
        # prod: the gRPC port serves mutual TLS (components/mtls), the probes go to its plaintext health port
        probe_port = generate.health_port(svc) if overlay == "prod" else svc["grpc_port"]
        assert c["readinessProbe"]["grpc"] == {"port": probe_port, "service": svc["grpc_service"]}
        assert c["livenessProbe"]["grpc"]["port"] == c["startupProbe"]["grpc"]["port"] == probe_port
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 180  # model load + warm-up
        env_cm = next(cm for n, cm in config_maps.items() if n.startswith(f"{name}-settings"))["data"]
        assert env_cm[f"{p}HOST"] == "0.0.0.0" and env_cm[f"{p}MODEL_REPOSITORY"] == "/models"
        assert ("REDIS_URL" in env_cm) == svc["redis"]
        annotations = deployments[name]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["mlplatform.io/settings-sha256"] == generate.settings_digest(env_cm)
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        budget = pre_stop + float(env_cm[f"{p}DRAIN_DELAY_S"]) + float(env_cm[f"{p}GRACE_PERIOD_S"])
        assert pod["terminationGracePeriodSeconds"] > budget
        assert pod["automountServiceAccountToken"] is False


def test_network_policies_gateway_to_services_fraud_to_redis(rendered, services):
    policies = by_kind(rendered["prod"][1], "NetworkPolicy")

    def sources(name: str, port: int) -> list:
        rules = [r for r in policies[name]["spec"]["ingress"] if {"port": port, "protocol": "TCP"} in r["ports"]]
        return [f for r in rules for f in r.get("from", [{"anywhere": True}])]

    pods = lambda *names: [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": n}}} for n in names]  # noqa: E731
    for name, svc in services.items():
        assert sources(name, svc["grpc_port"]) == pods("gateway")
    assert sources("redis", 6379) == pods(*(n for n, s in services.items() if s["redis"]))
    assert sources("ratelimit-redis", 6379) == pods("ratelimit")
    assert sources("ratelimit", 8081) == pods("gateway")


def test_dev_is_one_replica_without_autoscalers_or_canaries(rendered):
    objects = rendered["dev"][1]
    assert {d["spec"]["replicas"] for d in by_kind(objects, "Deployment").values()} == {1}
    assert not {o["kind"] for o in objects} & {"ScaledObject", "HorizontalPodAutoscaler", "Rollout"}


def test_gateway_runs_the_rendered_config(rendered):
    for overlay in OVERLAYS:
        objects = rendered[overlay][1]
        pod = by_kind(objects, "Deployment")["gateway"]["spec"]["template"]["spec"]
        # mlplatform_gateway.local.envoy_command on the mounted ConfigMap (Envoy's arguments to the image's entrypoint),
        # one worker per core of the container's CPU limit (not of the node)
        container = pod["containers"][0]
        workers = int(float(str(container["resources"]["limits"]["cpu"]).removesuffix("m")) /
                      (1000 if str(container["resources"]["limits"]["cpu"]).endswith("m") else 1))
        # with the preStop drain's window (tests/gateway/test_drain.py checks the hook and the grace period)
        drain_time = int(container["args"][container["args"].index("--drain-time-s") + 1])
        assert container["args"] == envoy_command(Path("/etc/envoy/config/envoy.yaml"), concurrency=workers,
                                                  drain_time_s=drain_time)[1:]
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:4] == ["python", "-m", "mlplatform_gateway", "drain"]
        cm_name = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"]
        assert cm_name.startswith("gateway-envoy-")  # hashed: a config change rolls the gateway
        # prod: the mtls component's config (the prod overlay's values plus upstreams.tls) replaces the overlay's
        source = {"dev": "base/platform", "prod": "components/mtls", "kserve": "overlays/kserve"}[overlay]
        config = by_kind(objects, "ConfigMap")[cm_name]["data"]["envoy.yaml"]
        assert config == (ROOT / "k8s" / source / "gateway" / "envoy.yaml").read_text()


# --- custom resources -------------------------------------------------------------------------

def metric_names(text: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"(?<![\w:])inference_[a-z_]+", text)}


def test_every_metric_referenced_exists_in_the_libs():
    declared = set(re.findall(r'"(inference_[a-z_]+)"', METRICS_SOURCE))
    used = set()
    for path in [*(ROOT / "k8s").rglob("*.yaml"), ROOT / "monitoring" / "alerts.yaml"]:
        if "gateway" not in path.parts:
            used |= metric_names(path.read_text())
    assert used and used <= declared, used - declared
    assert {"inference_queue_depth", "inference_requests_total", "inference_request_duration_seconds",
            "inference_rejected_total"} <= used


def test_scaled_objects_scale_on_queue_depth_with_a_five_minute_scale_down(rendered, services):
    for overlay, target_kind in (("prod", "Rollout"),):
        objects = rendered[overlay][1]
        scaled = by_kind(objects, "ScaledObject")
        assert set(scaled) == set(services)
        for name, so in scaled.items():
            spec = so["spec"]
            assert spec["scaleTargetRef"] == {"apiVersion": "argoproj.io/v1alpha1", "kind": target_kind, "name": name}
            assert name in by_kind(objects, target_kind)
            auto = services[name]["autoscaling"]
            assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (auto["min_replicas"], auto["max_replicas"])
            assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
            behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
            (trigger,) = spec["triggers"]
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            meta = trigger["metadata"]
            assert meta["serverAddress"].startswith("http://") and float(meta["threshold"]) > 0
            assert meta["query"] == f'sum(inference_queue_depth{{namespace="mlplatform", model="{name}"}})'
    base = yaml.safe_load_all((ROOT / "k8s/base/services/fraud.yaml").read_text())
    assert next(o for o in base if o["kind"] == "ScaledObject")["spec"]["scaleTargetRef"]["kind"] == "Deployment"


def test_one_owner_of_each_replica_count(rendered, services):
    """Argo's migration guidance for `workloadRef`: in prod the Deployments stay at 0 and the Rollouts set no
    `replicas` (KEDA scales them), so re-applying the manifests neither conflicts with the autoscaler nor
    brings back pods Argo removed; the base Deployments leave the count to KEDA too."""
    prod = rendered["prod"][1]
    assert {n: d["spec"]["replicas"] for n, d in by_kind(prod, "Deployment").items() if n in services} == {
        n: 0 for n in services}
    assert all("replicas" not in r["spec"] for r in by_kind(prod, "Rollout").values())
    assert {so["spec"]["scaleTargetRef"]["kind"] for so in by_kind(prod, "ScaledObject").values()} == {"Rollout"}
    for name in services:
        base = list(yaml.safe_load_all((ROOT / f"k8s/base/services/{name}.yaml").read_text()))
        assert "replicas" not in next(o for o in base if o["kind"] == "Deployment")["spec"]


def test_rollouts_canary_with_analysis(rendered, services):
    """The steps themselves: tests/deploy/test_canary_routing.py."""
    objects = rendered["prod"][1]
    rollouts, templates = by_kind(objects, "Rollout"), by_kind(objects, "AnalysisTemplate")
    k8s_services, deployments = by_kind(objects, "Service"), by_kind(objects, "Deployment")
    assert set(rollouts) == set(services)
    for name, rollout in rollouts.items():
        spec = rollout["spec"]
        assert spec["workloadRef"]["kind"] == "Deployment" and spec["workloadRef"]["name"] in deployments
        assert spec["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]
        canary = spec["strategy"]["canary"]
        assert canary["stableService"] in k8s_services and canary["canaryService"] in k8s_services
        template = templates[canary["analysis"]["templates"][0]["templateName"]]
        declared = {a["name"] for a in template["spec"]["args"]}
        assert {a["name"] for a in canary["analysis"]["args"]} == declared
        assert {a["valueFrom"]["podTemplateHashValue"] for a in canary["analysis"]["args"]} == {"Latest", "Stable"}
        for metric in template["spec"]["metrics"]:
            prom = metric["provider"]["prometheus"]
            assert prom["address"].startswith("http://") and metric["successCondition"]
            assert set(re.findall(r"\{\{args\.([\w-]+)\}\}", prom["query"])) <= declared
        assert {m["name"] for m in template["spec"]["metrics"]} == {"error-rate", "p95-latency"}


def test_pod_monitors_scrape_a_declared_port_and_keep_the_rollout_hash(rendered, services):
    objects = rendered["prod"][1]
    deployments = by_kind(objects, "Deployment")
    for name, monitor in by_kind(objects, "PodMonitor").items():
        pod = deployments[name]["spec"]["template"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
        if name in services:
            assert "rollouts-pod-template-hash" in monitor["spec"]["podTargetLabels"]


def test_prometheus_rule_has_the_seed_alerts(rendered):
    (rule,) = by_kind(rendered["prod"][1], "PrometheusRule").values()
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"InferenceLatencyP95High", "InferenceErrorRateHigh", "InferenceQueueSaturated"} <= set(alerts)
    assert alerts["InferenceLatencyP95High"]["expr"].endswith("> 0.1")
    assert alerts["InferenceErrorRateHigh"]["expr"].endswith("> 0.001")
    assert all(r.get("expr") and ("alert" in r or "record" in r) for g in rule["spec"]["groups"] for r in g["rules"])


def test_kserve_inference_services_are_custom_grpc_predictors_with_a_canary(rendered, services):
    objects = rendered["kserve"][1]
    isvcs = by_kind(objects, "InferenceService")
    assert set(isvcs) == set(services) and not by_kind(objects, "Deployment").keys() & set(services)
    for name, isvc in isvcs.items():
        predictor = isvc["spec"]["predictor"]
        assert predictor["canaryTrafficPercent"] == 5
        (container,) = predictor["containers"]
        assert container["ports"] == [{"name": "h2c", "containerPort": services[name]["grpc_port"], "protocol": "TCP"}]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["STORAGE_URI"].startswith("s3://")
        assert env[f"{services[name]['env_prefix']}MODEL_REPOSITORY"] == "/mnt/models"
        assert container["command"] == ["python", "-m", services[name]["module"]]
        assert predictor["serviceAccountName"] in by_kind(objects, "ServiceAccount")
        assert predictor["labels"] == {"app.kubernetes.io/name": name}  # what the NetworkPolicies select


# Knative Serving refuses these pod-spec fields unless its feature flag is on (config-features).
KNATIVE_FLAGS = {"nodeSelector": "kubernetes.podspec-nodeselector", "tolerations": "kubernetes.podspec-tolerations",
                 "securityContext": "kubernetes.podspec-securitycontext"}


def test_kserve_predictors_can_become_ready_under_knative(rendered):
    """No container `lifecycle` (Knative rejects it), and every gated pod-spec field the predictors use has its
    flag in k8s/overlays/kserve/knative-features.yaml, the patch the runbook applies to `config-features`."""
    (features,) = yaml.safe_load_all((ROOT / "k8s/overlays/kserve/knative-features.yaml").read_text())
    assert (features["kind"], features["metadata"]) == (
        "ConfigMap", {"name": "config-features", "namespace": "knative-serving"})
    enabled = {k for k, v in features["data"].items() if v == "enabled"}
    for name, isvc in by_kind(rendered["kserve"][1], "InferenceService").items():
        predictor = isvc["spec"]["predictor"]
        assert all("lifecycle" not in c for c in predictor["containers"]), name
        used = {KNATIVE_FLAGS[f] for f in KNATIVE_FLAGS if predictor.get(f)}
        if any("emptyDir" in v for v in predictor.get("volumes", [])):
            used.add("kubernetes.podspec-emptydir")
        assert used and used <= enabled, (name, used - enabled)


def test_generator_namespace_is_the_service_list_namespace(deploy_cfg):
    assert generate.NAMESPACE == deploy_cfg["namespace"] == "mlplatform"


def test_gateway_serves_tls_from_the_gateway_tls_secret(rendered):
    """Kubernetes: TLS by default; the certificate is the `gateway-tls` Secret mounted where the k8s variant reads it
    (cert-manager's Certificate makes it in prod, for the Service's DNS names)."""
    from mlplatform_gateway import render

    tls = render.load_values("k8s")["tls"]
    assert tls["enabled"] is True and tls["plain_http"] == "redirect"
    for overlay in OVERLAYS:
        objects = rendered[overlay][1]
        pod = by_kind(objects, "Deployment")["gateway"]["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == "gateway-tls"
        envoy = next(c for c in pod["containers"] if c["name"] == "gateway")
        assert {"name": "tls", "mountPath": tls["dir"], "readOnly": True} in envoy["volumeMounts"]
        assert envoy["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        certs = by_kind(objects, "Certificate")
        if overlay == "prod":
            # the others are the internal CA's (components/mtls, tests/deploy/test_mtls.py)
            (cert,) = (c for c in certs.values() if c["spec"]["issuerRef"]["kind"] == "ClusterIssuer")
            assert cert["spec"]["secretName"] == "gateway-tls"
            assert "gateway.mlplatform.svc.cluster.local" in cert["spec"]["dnsNames"]
        else:
            assert not certs  # dev / kserve: the Secret is created by hand (docs/runbooks/deploy.md, step 3)
