"""Mutual TLS from the gateway to the model services in the cluster (k8s/components/mtls, in the prod overlay):
the rendered prod overlay wires every piece together (cert-manager's internal CA and certificates, the services'
Secrets, settings and probes, the gateway's client certificate and its Envoy clusters), and dev and kserve have
none of it. The Envoy config itself is validated by test_generated.py, the cert-manager objects against their
CRD schemas by test_crd_schemas.py."""

from __future__ import annotations

import posixpath

import pytest
import yaml

from deploy import generate
from tests.deploy.conftest import by_kind

UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def container(objects: list[dict], name: str) -> tuple[dict, dict]:
    """(pod spec, the service's container) of Deployment `name`."""
    pod = by_kind(objects, "Deployment")[name]["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == name)


def mounted_secret(pod: dict, c: dict, directory: str) -> tuple[dict, str]:
    """(the container's mount of `directory`, the name of the Secret mounted there)."""
    mount = next(m for m in c.get("volumeMounts", []) if m["mountPath"] == directory)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return mount, volume["secret"]["secretName"]


def certificate_for_secret(objects: list[dict], secret: str) -> dict:
    certs = [c for c in by_kind(objects, "Certificate").values() if c["spec"]["secretName"] == secret]
    assert len(certs) == 1, f"{len(certs)} Certificates write the Secret {secret}"
    return certs[0]


def gateway_config_map(objects: list[dict]) -> dict[str, str]:
    """The data of the ConfigMap the gateway pod mounts."""
    pod, _ = container(objects, "gateway")
    cm_name = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"]
    return by_kind(objects, "ConfigMap")[cm_name]["data"]


def gateway_config(objects: list[dict]) -> tuple[dict, dict]:
    """(the Envoy config, the values) of the ConfigMap the gateway pod mounts."""
    data = gateway_config_map(objects)
    return yaml.safe_load(data["envoy.yaml"]), yaml.safe_load(data.get("values.yaml") or "{}")


def sds_secret(objects: list[dict], ref: dict) -> dict:
    """The Secret an SDS reference of the gateway's config names, read from the file the pod has at its path:
    it must be in the mounted ConfigMap (mounted at the config's directory) and hold exactly that secret."""
    _, c = container(objects, "gateway")
    path = ref["sds_config"]["path_config_source"]["path"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert posixpath.dirname(path) == mount["mountPath"] and "subPath" not in mount, (path, mount)
    data = gateway_config_map(objects)
    assert posixpath.basename(path) in data, f"{path} is not in the gateway's ConfigMap ({sorted(data)})"
    [secret] = yaml.safe_load(data[posixpath.basename(path)])["resources"]
    assert secret["@type"] == "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    assert secret["name"] == ref["name"]
    return secret


def service_clusters(config: dict, name: str, namespace: str) -> list[dict]:
    """The Envoy clusters whose endpoints are the service's pods (stable and canary headless Services)."""
    hosts = {f"{name}-headless.{namespace}.svc.cluster.local", f"{name}-canary-headless.{namespace}.svc.cluster.local"}
    found = []
    for cluster in config["static_resources"]["clusters"]:
        endpoints = cluster.get("load_assignment", {}).get("endpoints", [])
        addresses = {e["endpoint"]["address"]["socket_address"]["address"]
                     for group in endpoints for e in group["lb_endpoints"]}
        if addresses & hosts:
            assert addresses <= hosts, f"{cluster['name']}: {addresses}"
            found.append(cluster)
    return found


@pytest.fixture(scope="module")
def prod(rendered) -> list[dict]:
    return rendered["prod"][1]


def test_every_service_serves_mutual_tls_from_its_mounted_secret(prod, services):
    for name, svc in services.items():
        pod, c = container(prod, name)
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        p = svc["env_prefix"]
        files = {k: env.get(f"{p}{k}") for k in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE")}
        assert all(files.values()), f"{name}: {env}"
        directories = {posixpath.dirname(f) for f in files.values()}
        assert len(directories) == 1, f"{name}: {files}"
        mount, secret = mounted_secret(pod, c, directories.pop())
        assert mount["readOnly"] is True and "subPath" not in mount, f"{name}: {mount}"  # renewals reach the files
        # cert-manager's Secret layout: the certificate, its key, and the issuing CA (the gateway's too)
        assert {k: posixpath.basename(f) for k, f in files.items()} == {
            "TLS_CERT_FILE": "tls.crt", "TLS_KEY_FILE": "tls.key", "TLS_CLIENT_CA_FILE": "ca.crt"}
        assert secret == f"{name}-grpc-tls"
        assert certificate_for_secret(prod, secret)["spec"]["commonName"] == name
        assert env[f"{p}HEALTH_PORT"] == str(svc["grpc_port"] + 50)
        # the base's conventions hold for the patched container
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["envFrom"] == [{"configMapRef": {"name": c["envFrom"][0]["configMapRef"]["name"]}}]


def test_probes_use_the_plaintext_health_port(prod, rendered, services):
    assert {n: generate.health_port(s) for n, s in services.items()} == {
        "fraud": 50101, "cnn": 50102, "sentiment": 50103, "generic": 50104}
    for name, svc in services.items():
        _, c = container(prod, name)
        _, dev = container(rendered["dev"][1], name)
        health = svc["grpc_port"] + 50
        assert {"name": "health", "containerPort": health, "protocol": "TCP"} in c["ports"]
        assert {"name": "grpc", "containerPort": svc["grpc_port"], "protocol": "TCP"} in c["ports"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # the same health services as without TLS, on the other port; timings unchanged
            assert c[probe]["grpc"] == {**dev[probe]["grpc"], "port": health}, f"{name} {probe}"
            assert {k: v for k, v in c[probe].items() if k != "grpc"} == {
                k: v for k, v in dev[probe].items() if k != "grpc"}
        assert c["readinessProbe"]["grpc"]["service"] == svc["grpc_service"]


def test_service_certificates_name_the_service_and_come_from_the_internal_ca(prod, services, deploy_cfg):
    issuers = by_kind(prod, "Issuer")
    certs = by_kind(prod, "Certificate")
    ns = deploy_cfg["namespace"]
    for name in services:
        spec = certificate_for_secret(prod, f"{name}-grpc-tls")["spec"]
        assert spec["dnsNames"] == [name, f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        assert "server auth" in spec["usages"] and "client auth" not in spec["usages"]
        assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
        assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": "mlplatform-internal-ca"}
        assert not spec.get("isCA")
        assert hours(spec["renewBefore"]) < hours(spec["duration"])
    # The CA Issuer signs from the Secret of the internal CA's Certificate, itself issued by a self-signed Issuer:
    # all namespaced, nothing cluster-wide.
    ca_secret = issuers["mlplatform-internal-ca"]["spec"]["ca"]["secretName"]
    ca = certificate_for_secret(prod, ca_secret)["spec"]
    assert ca["isCA"] is True and ca["privateKey"]["algorithm"] == "ECDSA"
    assert ca["issuerRef"]["kind"] == "Issuer"
    assert issuers[ca["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}
    # Renewed with its key kept: every certificate it signed still chains to the renewed CA certificate.
    assert ca["privateKey"]["rotationPolicy"] == "Never"
    assert hours(ca["duration"]) > 10 * hours(certs[f"{next(iter(services))}-grpc-tls"]["spec"]["duration"])
    for cert in certs.values():
        assert cert["spec"]["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
        if cert["spec"]["issuerRef"]["kind"] == "Issuer":
            assert cert["spec"]["issuerRef"]["name"] in issuers, cert["metadata"]["name"]


def hours(duration: str) -> float:
    assert duration.endswith("h"), duration
    return float(duration[:-1])


def test_gateway_presents_its_client_certificate_from_the_mounted_secret(prod):
    config, values = gateway_config(prod)
    tls_dir = values["upstreams"]["tls"]["dir"]
    assert values["upstreams"]["tls"] == {"enabled": True, "dir": generate.GATEWAY_UPSTREAM_TLS_DIR}
    pod, c = container(prod, "gateway")
    mount, secret = mounted_secret(pod, c, tls_dir)
    assert mount["readOnly"] is True and "subPath" not in mount
    assert secret == "gateway-upstream-tls"
    spec = certificate_for_secret(prod, secret)["spec"]
    assert "client auth" in spec["usages"] and "server auth" not in spec["usages"]
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": "mlplatform-internal-ca"}
    # The route-sync sidecar renders with the same values (the ConfigMap's values.yaml) as Envoy's config.
    assert values == generate.PROD_MTLS_GATEWAY
    assert config == yaml.safe_load((generate.K8S / "components" / "mtls" / "gateway" / "envoy.yaml").read_text())


def test_every_service_cluster_verifies_the_internal_ca_and_the_service_name(prod, services, deploy_cfg):
    config, values = gateway_config(prod)
    tls_dir = values["upstreams"]["tls"]["dir"]
    for name in services:
        clusters = service_clusters(config, name, deploy_cfg["namespace"])
        assert len(clusters) == 2, f"{name}: stable and canary pods, got {[c['name'] for c in clusters]}"
        for cluster in clusters:
            socket = cluster.get("transport_socket", {})
            tls = socket.get("typed_config", {})
            assert tls.get("@type") == UPSTREAM_TLS, f"{cluster['name']}: {socket}"
            assert tls["sni"] == name
            context = tls["common_tls_context"]
            # Both through SDS files: a renewed client certificate or CA is taken without a restart (the Secret
            # volume's directory is watched).
            [cert_ref] = context["tls_certificate_sds_secret_configs"]
            assert sds_secret(prod, cert_ref)["tls_certificate"] == {
                "certificate_chain": {"filename": f"{tls_dir}/tls.crt"},
                "private_key": {"filename": f"{tls_dir}/tls.key"}, "watched_directory": {"path": tls_dir}}
            combined = context["combined_validation_context"]
            ca = sds_secret(prod, combined["validation_context_sds_secret_config"])["validation_context"]
            assert ca == {"trusted_ca": {"filename": f"{tls_dir}/ca.crt"}, "watched_directory": {"path": tls_dir}}
            assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
                {"san_type": "DNS", "matcher": {"exact": name}}]


def test_the_grpc_ports_say_tls_and_nothing_more_is_opened(prod, rendered, services):
    policies = by_kind(prod, "NetworkPolicy")
    for name, svc in services.items():
        for service in (name, f"{name}-headless", f"{name}-canary-headless"):
            grpc = next(p for p in by_kind(prod, "Service")[service]["spec"]["ports"] if p["name"] == "grpc")
            assert grpc["appProtocol"] == "https", service  # HTTP/2 over TLS, no longer h2c
            dev = next(p for p in by_kind(rendered["dev"][1], "Service")[service]["spec"]["ports"]
                       if p["name"] == "grpc")
            assert dev["appProtocol"] == "kubernetes.io/h2c"
        # The NetworkPolicy is the base's: gRPC from the gateway, metrics from monitoring. The health port is
        # only for the kubelet, whose probes NetworkPolicy does not filter: nobody else is let in.
        policy = policies[name]["spec"]
        assert policy == by_kind(rendered["dev"][1], "NetworkPolicy")[name]["spec"]
        ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
        assert ports == {svc["grpc_port"], svc["metrics_port"]}


def test_the_canary_pods_get_the_same_template(prod, services):
    """The Rollouts run the Deployments' pod template (workloadRef): the patched template is the canary's too."""
    rollouts = by_kind(prod, "Rollout")
    for name in services:
        ref = rollouts[name]["spec"]["workloadRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", name)
        assert "template" not in rollouts[name]["spec"]


@pytest.mark.parametrize("overlay", ["dev", "kserve"])
def test_other_overlays_have_none_of_it(rendered, overlay, services):
    objects = rendered[overlay][1]
    assert not by_kind(objects, "Issuer")
    assert not {n for n in by_kind(objects, "Certificate")} - {"gateway-tls"}
    text = yaml.safe_dump_all(objects)
    assert "TLS_CLIENT_CA_FILE" not in text and "HEALTH_PORT" not in text and "grpc-tls" not in text
    config, values = gateway_config(objects)
    assert not (values.get("upstreams") or {}).get("tls")
    pod, _ = container(objects, "gateway")
    assert "gateway-upstream-tls" not in yaml.safe_dump(pod)
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in services or cluster["name"].endswith("_canary_pods"):
            assert "transport_socket" not in cluster, f"{overlay} {cluster['name']}"


@pytest.mark.parametrize("overlay", ["dev", "prod", "kserve"])
def test_the_listener_certificate_comes_through_sds_from_the_mounted_secret(rendered, overlay):
    """Every overlay's gateway: its TLS listener names the gateway-tls Secret's files through an SDS file its
    ConfigMap carries, watching the Secret volume's directory (a renewal swaps the volume's `..data` link)."""
    objects = rendered[overlay][1]
    config, _ = gateway_config(objects)
    listener = next(x for x in config["static_resources"]["listeners"] if x["name"] == "gateway")
    chain = next(fc for fc in listener["filter_chains"] if fc.get("transport_socket"))
    context = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert "tls_certificates" not in context
    [ref] = context["tls_certificate_sds_secret_configs"]
    pod, c = container(objects, "gateway")
    mount, secret = mounted_secret(pod, c, "/etc/envoy/tls")
    assert secret == "gateway-tls" and "subPath" not in mount
    assert sds_secret(objects, ref)["tls_certificate"] == {
        "certificate_chain": {"filename": "/etc/envoy/tls/tls.crt"},
        "private_key": {"filename": "/etc/envoy/tls/tls.key"}, "watched_directory": {"path": "/etc/envoy/tls"}}
