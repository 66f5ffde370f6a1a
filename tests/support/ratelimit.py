"""A rate-limit service for the gateway tests: Envoy's `ShouldRateLimit` gRPC API on loopback, applying
the generated envoyproxy/ratelimit config (k8s/base/platform/ratelimit/config.yaml) the way that
service reads it. envoyproxy/ratelimit itself (Go, Redis) is not installable here; this stands in
for it so that the real Envoy's global `ratelimit` filter can be exercised end to end.

Matching, as envoyproxy/ratelimit does it: each request descriptor walks the config tree entry by
entry, preferring a node with the entry's key and value over one with the key alone; a limit
applies only when the walk ends on a node that has one. Counters are per descriptor values, per
unit window.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_tools import protoc

from tests.support.procs import free_port

PROTO_DIR = Path(__file__).resolve().parent / "protos"
UNIT_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def _stubs() -> tuple[Any, Any]:
    out = Path(tempfile.mkdtemp(prefix="rls-stubs-"))
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}",
                      str(PROTO_DIR / "rls.proto")])
    if rc != 0:
        raise RuntimeError(f"protoc failed on rls.proto ({rc})")
    sys.path.insert(0, str(out))
    return importlib.import_module("rls_pb2"), importlib.import_module("rls_pb2_grpc")


def find_limit(config: dict[str, Any], entries: list[tuple[str, str]]) -> dict[str, Any] | None:
    """The rate_limit that a descriptor's entries reach in the config tree, or None."""
    level = config.get("descriptors", [])
    node = None
    for key, value in entries:
        exact = [d for d in level if d["key"] == key and d.get("value") == value]
        wildcard = [d for d in level if d["key"] == key and "value" not in d]
        node = (exact or wildcard or [None])[0]
        if node is None:
            return None
        level = node.get("descriptors", [])
    return node.get("rate_limit") if node else None


class RateLimitServer:
    """ShouldRateLimit on a free loopback port; records every request's domain and descriptors."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.port = free_port()
        self.requests: list[tuple[str, list[list[tuple[str, str]]]]] = []
        self._counts: Counter[tuple] = Counter()
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None

    def start(self) -> RateLimitServer:
        pb, pb_grpc = _stubs()
        outer = self

        class Servicer(pb_grpc.RateLimitServiceServicer):
            def ShouldRateLimit(self, request, context):
                descriptors = [[(e.key, e.value) for e in d.entries] for d in request.descriptors]
                over = outer.hit(request.domain, descriptors, request.hits_addend or 1)
                code = pb.RateLimitResponse.OVER_LIMIT if over else pb.RateLimitResponse.OK
                return pb.RateLimitResponse(overall_code=code)

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_RateLimitServiceServicer_to_server(Servicer(), self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        self._server.start()
        return self

    def hit(self, domain: str, descriptors: list[list[tuple[str, str]]], hits: int) -> bool:
        """Count the hits against every matching limit; True when one of them is exceeded."""
        with self._lock:
            self.requests.append((domain, descriptors))
            if domain != self.config["domain"]:
                return False
            over = False
            for entries in descriptors:
                limit = find_limit(self.config, entries)
                if limit is None:
                    continue
                window = int(time.time() // UNIT_S[limit["unit"]])
                key = (domain, tuple(entries), window)
                self._counts[key] += hits
                over |= self._counts[key] > limit["requests_per_unit"]
            return over

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait()
            self._server = None
