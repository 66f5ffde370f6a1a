"""The platform's rules (monitoring/alerts.yaml) on a shorter clock, derived mechanically for a test that must see
alerts fire and resolve in seconds rather than the production minutes.

Every duration of the file is divided by the same factor: each group's `interval`, each rule's `for`, and every
range in the expressions (`[5m]` -> `[10s]` with a factor of 30). Nothing else changes: the expressions are the
file's own text with only their durations rewritten (`scaled_rules` checks it), the thresholds, labels and
names are untouched, so a test loading the result exercises the same rules, only sooner. Recording rules keep
their names (`...:rate5m` is then a 10 s rate).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_RANGE = re.compile(r"\[([0-9a-z]+)(?::([0-9a-z]*))?\]")  # [range] or a subquery's [range:resolution]


def seconds(duration: str) -> float:
    """A Prometheus duration (`5m`, `1h30m`, `1500ms`) in seconds; ValueError for anything else."""
    parts = _PART.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * UNITS_S[u] for n, u in parts)


def duration(s: float) -> str:
    """Seconds as a Prometheus duration: whole seconds when exact, else milliseconds (at least 1 ms)."""
    ms = max(1, round(s * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def scale(value: str, factor: float) -> str:
    return duration(seconds(value) / factor)


def scale_expr(expr: str, factor: float) -> str:
    """`expr` with every range selector's (and subquery's) durations divided by `factor`."""
    def sub(m: re.Match[str]) -> str:
        rng = scale(m.group(1), factor)
        return f"[{rng}]" if m.group(2) is None else f"[{rng}:{scale(m.group(2), factor) if m.group(2) else ''}]"
    return _RANGE.sub(sub, expr)


def scaled_rules(path: Path, factor: float) -> dict[str, Any]:
    """The rules file at `path` with every duration divided by `factor` (see the module's docstring)."""
    original = yaml.safe_load(path.read_text())
    rules = copy.deepcopy(original)
    for group in rules["groups"]:
        if "interval" in group:
            group["interval"] = scale(group["interval"], factor)
        for rule in group["rules"]:
            rule["expr"] = scale_expr(rule["expr"], factor)
            if "for" in rule:
                rule["for"] = scale(rule["for"], factor)
    # Only durations changed: the texts agree once every range is blanked out.
    blank = lambda e: _RANGE.sub("[]", e)  # noqa: E731
    for g0, g1 in zip(original["groups"], rules["groups"], strict=True):
        for r0, r1 in zip(g0["rules"], g1["rules"], strict=True):
            assert blank(r0["expr"]) == blank(r1["expr"]) and {**r0, "expr": 0, "for": 0} == {**r1, "expr": 0, "for": 0}
    return rules
