"""A service's Prometheus `/metrics`, read over HTTP, as samples keyed by name and label set."""

from __future__ import annotations

import re
import urllib.request

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")


def scrape(port: int) -> Samples:
    """Every sample of `/metrics` on `port`: (name, labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: Samples = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much the sample with exactly these labels grew between two scrapes (0 when absent)."""
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)
