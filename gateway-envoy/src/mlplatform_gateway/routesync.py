"""route-sync: the gateway's canary routes follow each service's HTTPRoute.

Argo Rollouts' Gateway API plugin (`argoproj-labs/gatewayAPI`) drives a canary by editing the service's
HTTPRoute: `setWeight` sets the weights of the two backendRefs (`<name>-headless`, the stable pods, and
`<name>-canary-headless`), and `setHeaderRoute` adds a rule, named after the managed route, that sends
calls carrying a header to the canary Service alone. Our gateway is the data plane that honours that route:
this loop reads the routes from the Kubernetes API, turns each into the service's canary state
(`render.canary_state`: weight and tester route), renders the gateway's route table from the same
template as the rest of its config, and replaces Envoy's RDS file (`canary.routes_file`) atomically when
it changes. Envoy reloads the file by itself; nothing restarts, no call is dropped.

Only the configured canary header (`x-canary: true`) is honoured as a tester route: the gateway drops a
client's own `x-canary` and sets it from a verified token claim, so only testers reach the canary. A
header route on any other header (which any client could send) is ignored and logged. A route that
cannot be read (no stable/canary backendRef, all weights 0, weights that differ between its rules)
keeps the service's last good routes.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlplatform_gateway import render

log = logging.getLogger("mlplatform_gateway.routesync")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
ROUTES_API = "/apis/gateway.networking.k8s.io/v1/namespaces/{namespace}/httproutes"
DEFAULT_LABEL_SELECTOR = "app.kubernetes.io/part-of=mlplatform"


class RouteError(ValueError):
    """An HTTPRoute the gateway cannot turn into a canary split."""


@dataclass(frozen=True)
class CanaryRoute:
    """One service's canary state as its HTTPRoute says: percent of unmarked calls to the canary, whether
    testers' calls go there, where it came from, and the header routes ignored (client-settable headers)."""

    weight_percent: int
    testers: bool
    origin: str
    ignored: tuple[str, ...] = ()

    def as_values(self) -> dict[str, Any]:
        """The `canary.routes.<name>` entry of the gateway's values."""
        return {"weight_percent": self.weight_percent, "testers": self.testers, "origin": self.origin}


STABLE_DEFAULT = CanaryRoute(0, False, "no HTTPRoute: all calls to the stable pods")


def _header_matches(match: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(match.get("headers") or [])


def _is_tester_match(match: Mapping[str, Any], header: str) -> bool:
    """Every match of a tester rule must require exactly `header: true` (Exact is the default type)."""
    return any(h.get("name", "").lower() == header.lower() and h.get("type", "Exact") == "Exact"
               and h.get("value") == "true" for h in _header_matches(match))


def read_route(route: Mapping[str, Any], stable: str, canary: str, header: str) -> CanaryRoute:
    """The canary state an HTTPRoute (as the Gateway API plugin writes it) asks for.

    Weight rules hold both backendRefs (`stable`, `canary`); their weights (Gateway API default 1) give the
    canary's percent, rounded. A rule whose only backendRef is the canary and whose matches carry headers is
    a header route: a tester route when every match requires `header: true`, else ignored."""
    meta = route.get("metadata") or {}
    origin = f"HTTPRoute {meta.get('namespace', '?')}/{meta.get('name', '?')} generation {meta.get('generation', '?')}"
    percents: set[int] = set()
    testers = False
    ignored: list[str] = []
    for i, rule in enumerate((route.get("spec") or {}).get("rules") or []):
        refs = {ref.get("name"): ref for ref in rule.get("backendRefs") or []}
        name = rule.get("name") or f"rules[{i}]"
        if stable in refs and canary in refs:
            w_stable, w_canary = (int(refs[n].get("weight", 1)) for n in (stable, canary))
            if w_stable < 0 or w_canary < 0 or w_stable + w_canary == 0:
                raise RouteError(f"{origin}: rule {name} gives weights {w_stable}/{w_canary} to {stable}/{canary}")
            percents.add(round(100 * w_canary / (w_stable + w_canary)))
        elif set(refs) == {canary} and any(_header_matches(m) for m in rule.get("matches") or []):
            if all(_is_tester_match(m, header) for m in rule["matches"]):
                testers = True
            else:
                ignored.append(name)
    if not percents:
        raise RouteError(f"{origin}: no rule has both backendRefs {stable} and {canary}")
    if len(percents) > 1:
        raise RouteError(f"{origin}: its rules give the canary different weights {sorted(percents)}")
    return CanaryRoute(percents.pop(), testers, origin, tuple(ignored))


class KubernetesRoutes:
    """HTTPRoutes of one namespace from the Kubernetes API, with the pod's service-account token (re-read on
    every call: projected tokens rotate) and the cluster CA."""

    def __init__(self, namespace: str, server: str | None = None, token_file: Path | None = None,
                 ca_file: Path | None = None, label_selector: str = DEFAULT_LABEL_SELECTOR,
                 timeout_s: float = 5.0) -> None:
        if server is None:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise RouteError("no --api-server and KUBERNETES_SERVICE_HOST is not set (not in a pod)")
            server = f"https://{host}:{port}"
        self.url = server.rstrip("/") + ROUTES_API.format(namespace=namespace) + "?" + urllib.parse.urlencode(
            {"labelSelector": label_selector} if label_selector else {})
        self.token_file = token_file if token_file is not None else SERVICE_ACCOUNT_DIR / "token"
        ca = ca_file if ca_file is not None else SERVICE_ACCOUNT_DIR / "ca.crt"
        self.context = ssl.create_default_context(cafile=str(ca)) if server.startswith("https") else None
        self.timeout_s = timeout_s

    def list(self) -> dict[str, dict[str, Any]]:
        """name -> HTTPRoute object."""
        headers = {"Accept": "application/json"}
        if self.token_file.exists():
            headers["Authorization"] = "Bearer " + self.token_file.read_text().strip()
        request = urllib.request.Request(self.url, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as response:
            body = json.load(response)
        return {item["metadata"]["name"]: item for item in body.get("items") or []}


@dataclass
class RouteSync:
    """Keeps `out` (Envoy's RDS file) equal to the routes the services' HTTPRoutes ask for."""

    list_routes: Callable[[], Mapping[str, Mapping[str, Any]]]
    out: Path
    variant: str = "k8s"
    overrides: dict[str, Any] = field(default_factory=dict)
    stable_service: str = "{name}-headless"
    canary_service: str = "{name}-canary-headless"
    state: dict[str, CanaryRoute] = field(default_factory=dict)
    written: str | None = None

    def __post_init__(self) -> None:
        canary = render.load_values(self.variant, self.overrides).get("canary")
        if not canary:
            raise RouteError("the gateway's values have no `canary`: there is nothing to route")
        self.header = canary["header"]
        self.services = list(render.load_services())

    def desired(self, routes: Mapping[str, Mapping[str, Any]]) -> dict[str, CanaryRoute]:
        """Each service's canary state: from its HTTPRoute; stable-only without one; the last good state
        when its route cannot be read."""
        out = {}
        for name in self.services:
            route = routes.get(name)
            if route is None:
                out[name] = STABLE_DEFAULT
                continue
            try:
                out[name] = read_route(route, self.stable_service.format(name=name),
                                       self.canary_service.format(name=name), self.header)
            except (RouteError, TypeError, ValueError) as exc:
                log.error("%s: keeping its last good routes: %s", name, exc)
                out[name] = self.state.get(name, STABLE_DEFAULT)
        return out

    def render(self, state: Mapping[str, CanaryRoute]) -> str:
        """The RDS file for `state`."""
        routes = {name: s.as_values() for name, s in state.items()}
        overrides = render.deep_merge(self.overrides, {"canary": {"routes": routes}})
        return render.render_routes(self.variant, overrides, origin="route-sync")

    def apply(self, state: Mapping[str, CanaryRoute]) -> bool:
        """Write the routes for `state` when they differ from what is on disk; True when written."""
        for name, s in state.items():
            if s != self.state.get(name):
                ignored = f"; header routes ignored (client-settable headers): {', '.join(s.ignored)}" \
                    if s.ignored else ""
                log.info("%s: canary %d %%, testers %s (%s)%s", name, s.weight_percent,
                         "on" if s.testers else "off", s.origin, ignored)
        self.state = dict(state)
        text = self.render(state)
        if text == self.written:
            return False
        write_atomically(self.out, text)
        self.written = text
        return True

    def step(self) -> bool:
        """One poll: read the routes, write the file if it changed. The API unreachable: keep the file."""
        try:
            routes = self.list_routes()
        except (OSError, ValueError) as exc:
            log.warning("cannot list HTTPRoutes (%s); the gateway keeps its current routes", exc)
            if self.written is None:  # first start: the stable-only routes, so Envoy can start
                return self.apply({name: STABLE_DEFAULT for name in self.services})
            return False
        return self.apply(self.desired(routes))

    def run(self, interval_s: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Poll every `interval_s` until `stop()`."""
        while not stop():
            self.step()
            time.sleep(interval_s)


def write_atomically(path: Path, text: str) -> None:
    """Write then rename into place: Envoy's watched directory sees one move, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
