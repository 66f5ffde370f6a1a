"""What Argo Rollouts' Gateway API plugin does to an HTTPRoute, step by step, for tests of the gateway's route-sync.

Written from the plugin's documented behaviour and source (argoproj-labs/rollouts-plugin-trafficrouter-gatewayapi,
pkg/plugin/httproute.go): `setWeight` sets the canary backendRef's weight and the stable one's to the rest on every
rule that is not a managed header rule; `setHeaderRoute` appends, per rule holding the backends, a rule named after
the managed route whose matches are the original matches plus the header matches and whose only backendRef is the
canary Service; a `setHeaderRoute` without `match` (and the rollout's end) removes them."""

from __future__ import annotations

import copy
from typing import Any


def _managed(rule: dict[str, Any], canary: str) -> bool:
    refs = rule.get("backendRefs") or []
    return len(refs) == 1 and refs[0]["name"] == canary


def set_weight(route: dict[str, Any], stable: str, canary: str, weight: int) -> dict[str, Any]:
    """The route after `setWeight: weight`."""
    route = copy.deepcopy(route)
    for rule in route["spec"]["rules"]:
        if _managed(rule, canary):
            continue
        for ref in rule.get("backendRefs") or []:
            if ref["name"] == canary:
                ref["weight"] = weight
            elif ref["name"] == stable:
                ref["weight"] = 100 - weight
    route["metadata"]["generation"] = route["metadata"].get("generation", 1) + 1
    return route


def set_header_route(route: dict[str, Any], stable: str, canary: str, name: str,
                     match: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The route after `setHeaderRoute: {name, match}` (Argo's match list: headerName,
    headerValue.exact|prefix|regex)."""
    route = copy.deepcopy(route)
    ours = lambda rule: rule.get("name") == name or rule.get("name", "").startswith(f"{name}-")  # noqa: E731
    rules = [r for r in route["spec"]["rules"] if not ours(r)]
    if match:
        headers = []
        for m in match:
            value = m["headerValue"]
            if "exact" in value:
                headers.append({"name": m["headerName"], "type": "Exact", "value": value["exact"]})
            elif "prefix" in value:
                headers.append({"name": m["headerName"], "type": "RegularExpression", "value": value["prefix"] + ".*"})
            else:
                headers.append({"name": m["headerName"], "type": "RegularExpression", "value": value["regex"]})
        sources = [r for r in rules if not _managed(r, canary)
                   and {stable, canary} <= {ref["name"] for ref in r.get("backendRefs") or []}]
        for i, source in enumerate(sources):
            port = next(ref["port"] for ref in source["backendRefs"] if ref["name"] == canary)
            matches = [{**({"path": m["path"]} if "path" in m else {}),
                        "headers": [*(m.get("headers") or []), *headers]}
                       for m in source.get("matches") or []] or [{"headers": headers}]
            rules.append({"name": name if i == 0 else f"{name}-{i}", "matches": matches, "filters": [],
                          "backendRefs": [{"group": "", "kind": "Service", "name": canary, "port": port}]})
    route["spec"]["rules"] = rules
    route["metadata"]["generation"] = route["metadata"].get("generation", 1) + 1
    return route


def after_steps(route: dict[str, Any], stable: str, canary: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The route once `steps` (a Rollout's canary steps) have run."""
    for step in steps:
        if "setWeight" in step:
            route = set_weight(route, stable, canary, int(step["setWeight"]))
        elif "setHeaderRoute" in step:
            route = set_header_route(route, stable, canary, step["setHeaderRoute"]["name"],
                                     step["setHeaderRoute"].get("match"))
    return route
