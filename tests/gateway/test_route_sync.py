"""route-sync through the real Envoy: as the Gateway API plugin edits fraud's HTTPRoute (weights, the testers' header
rule), the gateway's traffic follows, with no restart and no failed call.

The Kubernetes API cannot run here, so a loopback HTTP server answers route-sync's one call (list the namespace's
HTTPRoutes, bearer token required) with the route the test edits the way the plugin does
(tests/support/gateway_api.py); route-sync runs as its own process with the CLI the prod sidecar uses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml
from mlplatform_gateway import render, routesync

from deploy import canary_plan, generate
from tests.gateway.test_canary import canary_replica, predict, upstreams  # noqa: F401  (fixture)
from tests.support import gateway_api
from tests.support.procs import ROOT, GatewayProcess

STABLE, CANARY = "fraud-headless", "fraud-canary-headless"
HEADER = render.load_values("k8s")["canary"]["header"]
TOKEN = "route-sync-test-token"


def fraud_route() -> dict[str, Any]:
    """fraud's HTTPRoute as the prod overlay ships it (generated with the Rollout)."""
    cfg = generate.load_services()
    route = generate.http_route(cfg, "fraud", cfg["services"]["fraud"])
    route["metadata"].update(namespace="mlplatform", generation=1)
    return route


# --- reading a route --------------------------------------------------------------------------------

def read(route: dict[str, Any]) -> routesync.CanaryRoute:
    return routesync.read_route(route, STABLE, CANARY, HEADER)


def test_read_route_follows_the_plugins_edits():
    route = fraud_route()
    assert (read(route).weight_percent, read(route).testers) == (0, False)
    route = gateway_api.set_weight(route, STABLE, CANARY, 5)
    assert (read(route).weight_percent, read(route).testers) == (5, False)
    tester = [{"headerName": HEADER, "headerValue": {"exact": "true"}}]
    route = gateway_api.set_header_route(route, STABLE, CANARY, canary_plan.TESTER_ROUTE, tester)
    state = read(route)
    assert (state.weight_percent, state.testers, state.ignored) == (5, True, ())
    assert state.origin == "HTTPRoute mlplatform/fraud generation 3"
    # The plugin leaves its header rules alone when it moves the weight.
    route = gateway_api.set_weight(route, STABLE, CANARY, 100)
    assert (read(route).weight_percent, read(route).testers) == (100, True)
    route = gateway_api.set_header_route(route, STABLE, CANARY, canary_plan.TESTER_ROUTE, None)
    assert (read(route).weight_percent, read(route).testers) == (100, False)


def test_header_routes_on_client_headers_are_ignored():
    """Any client can send `x-version: beta`; only the header the gateway sets from a verified claim routes."""
    route = gateway_api.set_header_route(fraud_route(), STABLE, CANARY, "beta-users",
                                         [{"headerName": "x-version", "headerValue": {"exact": "beta"}}])
    route = gateway_api.set_header_route(route, STABLE, CANARY, "prefix",
                                         [{"headerName": HEADER, "headerValue": {"prefix": "t"}}])
    state = read(route)
    assert (state.testers, state.ignored) == (False, ("beta-users", "prefix"))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["spec"]["rules"][0]["backendRefs"].pop(), "no rule has both"),
    (lambda r: [ref.update(weight=0) for ref in r["spec"]["rules"][0]["backendRefs"]], "weights 0/0"),
    (lambda r: r["spec"]["rules"].append({**r["spec"]["rules"][0], "backendRefs": [
        {"name": STABLE, "weight": 50}, {"name": CANARY, "weight": 50}]}), r"different weights \[0, 50\]"),
])
def test_unreadable_routes_are_refused_with_a_reason(edit, message):
    route = fraud_route()
    edit(route)
    with pytest.raises(routesync.RouteError, match=message):
        read(route)


def test_gateway_api_default_weight_is_one():
    route = fraud_route()
    for ref in route["spec"]["rules"][0]["backendRefs"]:
        del ref["weight"]
    assert read(route).weight_percent == 50


def test_a_broken_route_keeps_the_last_good_routes_and_a_missing_one_means_stable(tmp_path):
    routes: dict[str, dict] = {"fraud": gateway_api.set_weight(fraud_route(), STABLE, CANARY, 25)}
    sync = routesync.RouteSync(lambda: routes, tmp_path / "routes.yaml", overrides=generate.PROD_GATEWAY)
    assert sync.step() and sync.state["fraud"].weight_percent == 25
    written = (tmp_path / "routes.yaml").read_text()
    routes["fraud"]["spec"]["rules"][0]["backendRefs"].pop()
    assert not sync.step()  # nothing rewritten
    assert sync.state["fraud"].weight_percent == 25 and (tmp_path / "routes.yaml").read_text() == written
    routes.clear()
    assert sync.step() and sync.state["fraud"] == routesync.STABLE_DEFAULT


def test_api_unreachable_at_start_still_writes_stable_routes(tmp_path):
    def down() -> dict:
        raise OSError("connection refused")
    sync = routesync.RouteSync(down, tmp_path / "routes.yaml", overrides=generate.PROD_GATEWAY)
    assert sync.step()  # Envoy cannot start without the file
    assert {s.weight_percent for s in sync.state.values()} == {0}
    assert not sync.step()


# --- through the real Envoy -----------------------------------------------------------------------------

class FakeApi:
    """The one Kubernetes API call route-sync makes, on loopback: list HTTPRoutes (bearer token required)."""

    def __init__(self, route: dict[str, Any]) -> None:
        self.route = route
        self.calls = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.calls += 1
                expected = generate.NAMESPACE
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self.send_response(401)
                    self.end_headers()
                    return
                if not self.path.startswith(routesync.ROUTES_API.format(namespace=expected)):
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps({"kind": "HTTPRouteList", "items": [api.route]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi(fraud_route())
    yield fake
    fake.close()


def test_envoy_follows_the_route_as_argo_moves_the_canary(
        fraud_service, canary_replica, signing_key, token, fraud_features, api, tmp_path):  # noqa: F811
    routes_file = tmp_path / "routes" / "routes.yaml"
    k8s = render.load_values("k8s")["canary"]
    overrides = {"canary": {"header": k8s["header"], "claim": k8s["claim"], "host": "127.0.0.1",
                            "endpoints": {"fraud": [canary_replica.target]}, "routes_file": str(routes_file)}}
    gw = GatewayProcess({"fraud": [fraud_service.target]}, signing_key.jwks_path, overrides)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(gw.values))
    (tmp_path / "token").write_text(TOKEN)
    cmd = [sys.executable, "-m", "mlplatform_gateway", "route-sync", "--variant", "local", "--values", str(values),
           "--out", str(routes_file), "--api-server", api.url, "--token-file", str(tmp_path / "token"),
           "--interval-s", "0.2"]
    log = (tmp_path / "route-sync.log").open("w")
    sync = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while not routes_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert routes_file.exists(), (tmp_path / "route-sync.log").read_text()
        gw.start()
        gw.wait_healthy(1, cluster="fraud_canary_pods")
        stable, canary = fraud_service.target, canary_replica.target
        normal, tester = token(tier="internal"), token(tier="internal", canary_tester=True)
        features = fraud_features[0]

        def hosts(t: str, n: int) -> dict[str, int]:
            return dict(upstreams(gw, lambda: predict(gw, t, features, n, canary=False)))

        def rds_updates() -> int:
            stats = gw.admin("/stats?filter=rds.gateway.update_success")
            return int(re.search(r"http\.gateway\.rds\.gateway\.update_success: (\d+)", stats).group(1))

        def edit(*steps: dict[str, Any]) -> None:
            """Argo runs `steps`; wait until Envoy has loaded the routes route-sync wrote for them."""
            before = rds_updates()
            api.route = gateway_api.after_steps(api.route, STABLE, CANARY, list(steps))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if rds_updates() > before:
                    return
                time.sleep(0.1)
            raise AssertionError(f"Envoy loaded no new routes:\n{(tmp_path / 'route-sync.log').read_text()}")

        # At rest: everything to the stable pods, testers too (no header route).
        assert hosts(normal, 20) == {stable: 20} and hosts(tester, 10) == {stable: 10}
        edit(canary_plan.STEPS[1])  # setHeaderRoute canary-testers
        assert hosts(tester, 10) == {canary: 10} and hosts(normal, 20) == {stable: 20}
        edit({"setWeight": 30})
        split = hosts(normal, 120)
        assert set(split) == {stable, canary} and 15 <= split[canary] <= 60, split  # 30 % of 120: 36 expected
        edit({"setWeight": 100})
        assert hosts(normal, 20) == {canary: 20}
        # Promotion: weight back to 0, header rule removed.
        edit({"setWeight": 0}, {"setHeaderRoute": {"name": canary_plan.TESTER_ROUTE}})
        assert hosts(normal, 20) == {stable: 20} and hosts(tester, 10) == {stable: 10}
        assert api.calls > 5
        assert sync.poll() is None
        text = (tmp_path / "route-sync.log").read_text()
        assert "fraud: canary 30 %, testers on (HTTPRoute mlplatform/fraud generation" in text
    finally:
        sync.terminate()
        sync.wait(timeout=10)
        gw.stop()
    assert sync.returncode == 0  # SIGTERM: a clean stop
