"""The images and the compose stack for real, under podman: each image runs as non-root, passes its own
HEALTHCHECK and serves a prediction with the model repository mounted read-only; docker-compose.yml comes up
under podman-compose and answers every model through the gateway, REST and gRPC, then goes away entirely.

`make test` runs the fraud + gateway stack (MLPLATFORM_STACK unset); `make compose-test` builds every image and
runs everything (MLPLATFORM_STACK=all). Images: `make images`. Host ports are free loopback ports (an override
file remaps the compose ports), names carry this process's id, and everything is removed even on failure.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import containers as c
from tests.support.procs import ROOT, free_port, wait_for_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def refs() -> dict[str, str]:
    return c.image_refs()


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", ["fraud", "cnn", "sentiment", "generic"])
def test_service_image_runs_non_root_healthy_and_predicts(name, refs, services, model_repository):
    """The image's own CMD and USER, hardened as compose runs it (read-only root, no capabilities)."""
    if not c.in_stack(name):
        pytest.skip("make compose-test (MLPLATFORM_STACK=all) runs every image")
    spec, ref = services[name], refs[name]
    c.require_image(ref)
    p, port = spec["env_prefix"], free_port()
    container = f"mlplatform-test-{os.getpid()}-{name}"
    envs = {f"{p}HOST": "0.0.0.0", f"{p}MODEL_REPOSITORY": "/models"}
    if spec.get("models"):
        envs[f"{p}MODELS"] = ",".join(spec["models"])
    args = [f"--env={k}={v}" for k, v in envs.items()]
    try:
        c.podman("run", "--detach", "--name", container, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                 "--security-opt", "no-new-privileges", "--init", "--volume", f"{model_repository}:/models:ro",
                 "--publish", f"127.0.0.1:{port}:{spec['grpc_port']}", *args, ref)
        assert c.podman("image", "inspect", "--format", "{{.Config.User}}", ref).stdout.strip() == "10001:10001"
        c.wait_healthy(container, timeout=300)
        assert c.podman("exec", container, "id", "-u").stdout.strip() == "10001"
        assert c.grpc_predict(f"127.0.0.1:{port}", next(iter(spec.get("models", [name]))),
                              model_repository) == next(iter(spec.get("models", [name])))
    finally:
        c.podman("rm", "--force", "--time", "5", container, check=False)


@pytest.mark.timeout(120)
def test_gateway_image_runs_non_root_and_answers_ready(refs, tmp_path):
    """Envoy from the image on a rendered config (no upstream needed for /ready), non-root, healthy."""
    from mlplatform_gateway import auth, render, tls

    c.require_image(refs["gateway"])
    auth.ensure_dev_keys(tmp_path / "keys")
    certs = tls.ensure_dev_tls(tmp_path / "keys")
    config = tmp_path / "config"
    config.mkdir()
    (config / "envoy.yaml").write_text(render.render("compose", {"files_dir": "/etc/envoy"}))
    render.write_secrets("compose", {"files_dir": "/etc/envoy"}, config)  # the SDS files, beside it
    container, port = f"mlplatform-test-{os.getpid()}-gateway", free_port()
    try:
        c.podman("run", "--detach", "--name", container, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                 "--security-opt", "no-new-privileges", "--init",
                 "--volume", f"{config}:/etc/envoy/config:ro",
                 "--volume", f"{tmp_path / 'keys' / 'jwks.json'}:/etc/envoy/jwks.json:ro",
                 "--volume", f"{certs.directory}:/etc/envoy/tls:ro",
                 "--publish", f"127.0.0.1:{port}:8080", refs["gateway"])
        c.wait_healthy(container, timeout=60)
        assert c.podman("exec", container, "id", "-u").stdout.strip() == "10001"
        # TLS by default (the compose variant): /healthz over https with the dev CA; plaintext is redirected.
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=str(certs.ca))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=10, context=context) as resp:
            assert resp.status == 200
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        plain.request("GET", "/healthz")
        assert plain.getresponse().status == 308
        plain.close()
        # The prod pod's route-sync sidecar runs from this image (read-only root, non-root): with the API out of
        # reach it still writes the all-stable routes Envoy needs to start.
        routes = "/tmp/gateway-routes/routes.yaml"
        sync = c.podman("exec", container, "python", "-m", "mlplatform_gateway", "route-sync", "--once",
                        "--out", routes, "--api-server", "http://127.0.0.1:1", check=False)
        assert sync.returncode == 0, sync.stderr
        assert "RouteConfiguration" in c.podman("exec", container, "cat", routes).stdout
        # `podman stop` (a bare SIGTERM, as compose and `docker stop` send): the entrypoint drains Envoy first.
        c.podman("stop", "--time", "20", container)
        logs = c.podman("logs", container).stdout + c.podman("logs", container).stderr
        assert "gateway drained in" in logs, logs[-2000:]
        exit_code = c.podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip()
        assert exit_code == "0", logs[-2000:]
    finally:
        c.podman("rm", "--force", "--time", "5", container, check=False)


# --- the compose stack ------------------------------------------------------------------------------------------


class Compose:
    """podman-compose on docker-compose.yml plus a port override, under a project name of its own."""

    def __init__(self, project: str, override: Path) -> None:
        self.project, self.override = project, override

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        if not c.PODMAN_COMPOSE.exists():
            pytest.fail(f"{c.PODMAN_COMPOSE} is missing: run `make tools`")
        cmd = [str(c.PODMAN_COMPOSE), "--project-name", self.project, "-f", str(ROOT / "docker-compose.yml"),
               "-f", str(self.override), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**c.env(), "REDIS_IMAGE": c.image_refs()["redis"]})

    def leftovers(self) -> dict[str, str]:
        """Containers, pods and networks of this project that still exist."""
        label = f"label=io.podman.compose.project={self.project}"
        found = {
            "containers": c.podman("ps", "--all", "--quiet", "--filter", label, check=False).stdout.strip(),
            "pods": c.podman("pod", "ps", "--quiet", "--filter", f"name={self.project}", check=False).stdout.strip(),
            "networks": c.podman("network", "ls", "--quiet", "--filter", f"name={self.project}",
                                 check=False).stdout.strip(),
        }
        return {k: v for k, v in found.items() if v}

    def remove_everything(self) -> None:
        """down, then whatever down left behind (a failed up can leave containers, a pod, the network)."""
        self("down", "--timeout", "10", "--volumes", timeout=180)
        label = f"label=io.podman.compose.project={self.project}"
        ids = c.podman("ps", "--all", "--quiet", "--filter", label, check=False).stdout.split()
        if ids:
            c.podman("rm", "--force", "--time", "5", *ids, check=False)
        for pod in c.podman("pod", "ps", "--quiet", "--filter", f"name={self.project}", check=False).stdout.split():
            c.podman("pod", "rm", "--force", pod, check=False)
        for net in c.podman("network", "ls", "--quiet", "--filter", f"name={self.project}",
                            check=False).stdout.split():
            c.podman("network", "rm", "--force", net, check=False)


@pytest.fixture(scope="module")
def stack(refs, services, tmp_path_factory) -> Iterator[tuple[Compose, dict[str, int], list[str]]]:
    """The compose stack up (the fraud + gateway stack, or every service): (compose, host ports, services)."""
    names = ["redis", *(n for n in services if c.in_stack(n)), "gateway"]
    for name in names:
        c.require_image(refs[name])
    # make compose-config: the dev JWKS and the gateway's compose config, which the stack mounts.
    render = ["render", "--variant", "compose", "--validate", "--out", "build/gateway/compose/envoy.yaml"]
    for cmd in (["keys"], render):
        subprocess.run([sys.executable, "-m", "mlplatform_gateway", *cmd], check=True, cwd=ROOT, timeout=120,
                       capture_output=True)
    ports = {"gateway": free_port(), "admin": free_port()}
    override = tmp_path_factory.mktemp("compose") / "ports.yaml"
    # Free host ports instead of the fixed ones (a `make run` may hold 8080); what compose publishes is unchanged.
    override.write_text(
        "services:\n"
        f"  gateway:\n    ports: !override ['127.0.0.1:{ports['gateway']}:8080', '127.0.0.1:{ports['admin']}:9902']\n"
        + "".join(f"  {n}:\n    ports: !reset []\n" for n in names if n != "gateway"))
    compose = Compose(f"mlplatformtest{os.getpid()}", override)
    try:
        start = time.monotonic()
        up = compose("up", "--detach", "--no-deps", *names)
        assert up.returncode == 0, up.stdout + up.stderr
        for name in names:  # what depends_on: service_healthy waits for (podman 4.3: podman-compose cannot)
            c.wait_healthy(f"{compose.project}_{name}_1", timeout=300)
        print(f"compose stack {names} healthy after {time.monotonic() - start:.0f} s")
        yield compose, ports, [n for n in names if n not in ("redis", "gateway")]
    finally:
        compose.remove_everything()
        left = compose.leftovers()
        assert not left, f"left running after down: {left}"


@pytest.mark.timeout(900)
def test_compose_stack_answers_every_model_through_the_gateway(stack, services, model_repository):
    """REST and gRPC from the host through the gateway, each model (diabetes: the generic service's OIP)."""
    import ssl

    from mlplatform_gateway import auth, tls

    compose, ports, names = stack
    token = auth.mint_token(auth.ensure_dev_keys(ROOT / ".dev" / "gateway"), "compose-test")
    wait_for_port(ports["gateway"], timeout=30)
    # TLS by default: the dev certificate (make compose-config) for 127.0.0.1, REST over https, gRPC over TLS.
    ca = tls.ensure_dev_tls(ROOT / ".dev" / "gateway").ca
    context = ssl.create_default_context(cafile=str(ca))
    target, base_url = f"127.0.0.1:{ports['gateway']}", f"https://127.0.0.1:{ports['gateway']}"
    metadata = [("authorization", f"Bearer {token}")]
    models = [m for n in names for m in services[n].get("models", [n])]
    deadline = time.monotonic() + 60
    while True:  # the gateway's health checks see each upstream SERVING within a few seconds
        try:
            assert c.rest_predict(base_url, models[0], model_repository, token, context) == models[0]
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    for model in models:
        assert c.rest_predict(base_url, model, model_repository, token, context) == model, model
        assert c.grpc_predict(target, model, model_repository, metadata, ca=ca.read_bytes()) == model, model
    # Without a token the gateway refuses (the JWT filter runs in the container too).
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"{base_url}/api/v1/fraud", data=b"{}", method="POST"),
                               timeout=10, context=context)
    assert err.value.code == 401
    # Every container healthy, running as its image's user (the services: 10001).
    ps = compose("ps", "--format", "{{.Names}} {{.Status}}", timeout=60)
    assert ps.returncode == 0, ps.stderr
    for name in ["redis", *names, "gateway"]:
        c.wait_healthy(f"{compose.project}_{name}_1", timeout=30)
    for name in [*names, "gateway"]:
        uid = c.podman("exec", f"{compose.project}_{name}_1", "id", "-u").stdout.strip()
        assert uid == "10001", (name, uid)
