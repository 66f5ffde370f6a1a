"""The canary's steps, and what each step means in pods and traffic.

The prod overlay's Rollouts route traffic with Argo Rollouts' Gateway API plugin, so the weight a step
sets is the share of calls the gateway sends to the canary (route-sync copies it from the HTTPRoute), not
a ratio of pods. Argo sizes the ReplicaSets of a traffic-routed canary by its documented rules
(`CalculateReplicaCountsForTrafficRoutedCanary`): the canary gets `ceil(weight x replicas / 100)` pods,
or what a `setCanaryScale` step says until `matchTrafficWeight: true`; the stable ReplicaSet keeps all
`replicas` pods until the rollout is promoted (no `dynamicStableScale`). `plan` replays the steps with
those rules so the tests can hold the steps to what a canary must guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TESTER_ROUTE = "canary-testers"
"""The managed route (Rollout `managedRoutes`) that sends testers' calls (`x-canary: true`) to the canary."""

TESTER_HEADER = "x-canary"

STEPS: list[dict[str, Any]] = [
    # One canary pod, no traffic: testers (tokens with `canary_tester: true`) try it first.
    {"setCanaryScale": {"replicas": 1}},
    {"setHeaderRoute": {"name": TESTER_ROUTE,
                        "match": [{"headerName": TESTER_HEADER, "headerValue": {"exact": "true"}}]}},
    {"pause": {"duration": "15m"}},
    # Pods for a 5 % share before the share: the canary never gets more calls than its pods can take.
    {"setCanaryScale": {"weight": 5}},
    {"setWeight": 5},
    # From here the canary's pods follow its traffic share, and the analysis judges it.
    {"setCanaryScale": {"matchTrafficWeight": True}},
    {"pause": {"duration": "1h"}},
    {"setWeight": 25},
    {"pause": {"duration": "15m"}},
    {"setWeight": 50},
    {"pause": {"duration": "15m"}},
    {"setWeight": 100},
]
"""The canary of every service (deploy/generate.py writes them into each Rollout)."""


def first_traffic_step(steps: Sequence[dict[str, Any]]) -> int:
    """Index of the first step that gives the canary a share of the calls: where the analysis starts."""
    return next(i for i, s in enumerate(steps) if s.get("setWeight", 0) > 0)


@dataclass(frozen=True)
class StepState:
    """Where a rollout stands once a step has run."""

    step: int
    weight: int
    canary_pods: int
    stable_pods: int
    tester_route: bool


def plan(steps: Sequence[dict[str, Any]], replicas: int) -> list[StepState]:
    """Replay `steps` for a Rollout scaled to `replicas`: the traffic weight, the pods of each ReplicaSet and
    whether the tester route is set, after each step."""
    weight, scale, routes = 0, None, set()
    out = []
    for i, step in enumerate(steps):
        if "setWeight" in step:
            weight = int(step["setWeight"])
        elif "setCanaryScale" in step:
            spec = step["setCanaryScale"]
            scale = None if spec.get("matchTrafficWeight") else spec
        elif "setHeaderRoute" in step:
            route = step["setHeaderRoute"]
            (routes.add if route.get("match") else routes.discard)(route["name"])
        if scale is None:
            canary = math.ceil(weight * replicas / 100)
        elif "replicas" in scale:
            canary = int(scale["replicas"])
        else:
            canary = math.ceil(int(scale["weight"]) * replicas / 100)
        out.append(StepState(i, weight, canary, replicas, TESTER_ROUTE in routes))
    return out
