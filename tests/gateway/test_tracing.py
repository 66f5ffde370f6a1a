"""One trace across the gateway and the fraud service, collected over OTLP from both real processes.

What Envoy 1.40's OpenTelemetry tracer does (HCM `tracing`, `spawn_upstream_span` left off): it makes
ONE span per request, named "ingress", kind SERVER, with resource service.name "mlplatform-gateway".
That span is a child of the client's `traceparent` span (a root when the client sends none), and its
id is what Envoy writes into the `traceparent` it forwards upstream. So the fraud service's server
span is the child of the gateway's span, never of the client's span directly.

Envoy exports its spans on a 5 s timer (the runtime key `tracing.opentelemetry.flush_interval_ms`;
there is no config field for it), so every call is made first and the collector is polled once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from fraud.v1 import fraud_pb2 as pb
from fraud.v1 import fraud_pb2_grpc as pb_grpc
from mlplatform_gateway import auth
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from fraud_service.materialize import materialize
from tests.gateway.helpers import bearer, post
from tests.support.otlp import OtlpCollector, Received
from tests.support.procs import GatewayProcess, RedisServer, ServiceProcess

pytestmark = pytest.mark.integration

GATEWAY = "mlplatform-gateway"
SERVICE = "fraud"
RPC = "/fraud.v1.FraudService/Predict"
REST_PATH = "/api/v1/fraud"
# The gateway is rendered to flush spans every 0.2 s; the service's batch processor flushes every 0.1 s.
WAIT_S = 5.0


@dataclass(frozen=True)
class Call:
    transport: str  # "rest" or "grpc"
    trace_id: str | None = None  # the client's traceparent, when it sends one
    span_id: str | None = None
    card: str | None = None  # score by card_id (online features) instead of the 30 features

    @property
    def traceparent(self) -> str | None:
        return f"00-{self.trace_id}-{self.span_id}-01" if self.trace_id else None

    @property
    def path(self) -> str:
        return REST_PATH if self.transport == "rest" else RPC


CALLS = {
    "rest": Call("rest", "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"),
    "grpc": Call("grpc", "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"),
    "rest-untraced": Call("rest"),
    "grpc-untraced": Call("grpc"),
    "rest-card": Call("rest", "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", card="card-000003"),
}
# The child spans of the service's server span for a call by card (first sight of the transaction: a cache miss).
CARD_CHILDREN = {"features.read", "validate", "cache.get", "batch.queue_wait", "model.inference", "cache.set",
                 "audit.write"}


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    col = OtlpCollector().start()
    yield col
    col.stop()


@pytest.fixture(scope="module")
def traced_service(model_repository: Path, collector: OtlpCollector, redis_server: RedisServer
                   ) -> Iterator[ServiceProcess]:
    asyncio.run(materialize(redis_server.url, 10, 42))  # card-000000 .. card-000009 in the feature store
    svc = ServiceProcess("fraud_service", "FRAUD_", env={
        "FRAUD_MODEL_REPOSITORY": str(model_repository),
        "REDIS_URL": redis_server.url,
        "FRAUD_AUDIT_STREAM": "fraud:audit:tracing-test",
        "FRAUD_FEATURE_TIMEOUT_MS": "1000",  # a busy machine must not turn the card call into defaults
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    })
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def traced_gateway(traced_service: ServiceProcess, collector: OtlpCollector,
                   signing_key: auth.SigningKey) -> Iterator[GatewayProcess]:
    gw = GatewayProcess({"fraud": [traced_service.target]}, signing_key.jwks_path,
                        overrides={"tracing": {"otlp_endpoint": collector.endpoint, "flush_interval_ms": 200}})
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


def _attrs(span: Span) -> dict[str, str]:
    return {a.key: a.value.string_value for a in span.attributes}


def _ints(span: Span) -> dict[str, int]:
    return {a.key: a.value.int_value for a in span.attributes if a.value.HasField("int_value")}


def _trace(received: Received, trace_id: str) -> Received:
    return [(svc, s) for svc, s in received if s.trace_id.hex() == trace_id]


def _trace_id(received: Received, call: Call) -> str | None:
    """The call's trace: the client's, or the one the gateway started for it (its root span)."""
    if call.trace_id:
        return call.trace_id
    for svc, s in received:
        if svc == GATEWAY and not s.parent_span_id and urlsplit(_attrs(s).get("http.url", "")).path == call.path:
            return s.trace_id.hex()
    return None


def _complete(received: Received) -> bool:
    for call in CALLS.values():
        trace_id = _trace_id(received, call)
        spans = _trace(received, trace_id) if trace_id else []
        if not {(GATEWAY, "ingress"), (SERVICE, RPC)} <= {(svc, s.name) for svc, s in spans}:
            return False
        if call.card and not {s.name for svc, s in spans if svc == SERVICE} >= CARD_CHILDREN:
            return False  # the audit write is flushed after the answer
    return True


@pytest.fixture(scope="module")
def received(collector: OtlpCollector, traced_gateway: GatewayProcess, signing_key: auth.SigningKey,
             fraud_features: list[list[float]]) -> Received:
    """Every call in CALLS made through the gateway, then the spans both processes exported."""
    token = auth.mint_token(signing_key, "tracing-test")
    with grpc.insecure_channel(traced_gateway.target) as channel:
        client = pb_grpc.FraudServiceStub(channel)
        for i, (name, call) in enumerate(CALLS.items()):
            tx = {"transaction_id": f"tx-{name}", "features": fraud_features[i % len(fraud_features)]}
            if call.card:  # the transaction's own fields; the rest comes from the feature store
                tx = {"transaction_id": f"tx-{name}", "card_id": call.card, "amount": 61.25,
                      "merchant_category": "5812", "merchant_country": "FR", "channel": "CARD_PRESENT"}
            extra = [("traceparent", call.traceparent)] if call.traceparent else []
            if call.transport == "rest":
                resp = post(traced_gateway, REST_PATH, {"transaction": tx}, token=token, headers=dict(extra))
                assert resp.status == 200, (name, resp.status, resp.body)
                assert resp.json()["prediction"]["model_name"] == "fraud"
                if call.card:
                    assert resp.json()["prediction"]["feature_source"] == "store"
                    assert resp.json()["prediction"]["card_id"] == call.card
            else:
                reply = client.Predict(pb.PredictRequest(transaction=pb.Transaction(**tx)), timeout=10,
                                       metadata=bearer(token) + extra)
                assert reply.prediction.model_name == "fraud"
    return collector.wait_for(_complete, WAIT_S)


def _spans_of(received: Received, call: Call) -> tuple[str, Span, Span, Received]:
    """(trace id, the gateway's span, the service's server span, the whole trace) of one call."""
    trace_id = _trace_id(received, call)
    assert trace_id, f"no gateway root span for {call} in {WAIT_S}s; got {[(v, s.name) for v, s in received]}"
    spans = _trace(received, trace_id)
    gateway = [s for svc, s in spans if svc == GATEWAY]
    server = [s for svc, s in spans if svc == SERVICE and s.name == RPC]
    # Envoy makes exactly one span per request (no separate upstream span) and the service one server span.
    assert len(gateway) == 1, f"gateway spans in trace {trace_id}: {gateway}"
    assert len(server) == 1, f"{RPC} spans in trace {trace_id}: {[(v, s.name) for v, s in spans]}"
    return trace_id, gateway[0], server[0], spans


def _assert_gateway_span(span: Span, call: Call) -> None:
    attrs = _attrs(span)
    assert span.name == "ingress"
    assert span.kind == Span.SPAN_KIND_SERVER
    assert urlsplit(attrs["http.url"]).path == call.path
    assert attrs["http.protocol"] == ("HTTP/1.1" if call.transport == "rest" else "HTTP/2")
    # REST is transcoded: the upstream call is the gRPC method either way.
    assert attrs["grpc.path"] == RPC
    assert attrs["upstream_cluster"] == "fraud"
    assert attrs["http.status_code"] == "200"
    assert attrs["grpc.status_code"] == "0"
    assert span.end_time_unix_nano > span.start_time_unix_nano


def _assert_tree(spans: Received, root: Span, root_parent: bytes) -> None:
    """Every span of the trace hangs off another span of it; only the gateway's points outside."""
    ids = [s.span_id for _, s in spans]
    assert len(ids) == len(set(ids))
    for _, s in spans:
        if s.span_id == root.span_id:
            assert s.parent_span_id == root_parent
        else:
            assert s.parent_span_id in ids, s.name


@pytest.mark.parametrize("name", ["rest", "grpc", "rest-card"])
def test_client_traceparent_is_continued_by_gateway_and_service(received, name):
    call = CALLS[name]
    trace_id, gateway, server, spans = _spans_of(received, call)
    assert trace_id == call.trace_id
    _assert_gateway_span(gateway, call)
    # The gateway's span is the child of the client's span ...
    assert gateway.parent_span_id.hex() == call.span_id
    assert gateway.span_id.hex() != call.span_id
    # ... and the service continues the gateway's span, not the client's: Envoy rewrote traceparent.
    assert server.kind == Span.SPAN_KIND_SERVER
    assert server.parent_span_id == gateway.span_id
    assert server.parent_span_id.hex() != call.span_id
    assert server.start_time_unix_nano >= gateway.start_time_unix_nano
    assert server.end_time_unix_nano <= gateway.end_time_unix_nano
    assert {svc for svc, _ in spans} == {GATEWAY, SERVICE}
    _assert_tree(spans, gateway, bytes.fromhex(call.span_id))


@pytest.mark.parametrize("name", ["rest-untraced", "grpc-untraced"])
def test_gateway_starts_a_trace_the_service_continues(received, name):
    call = CALLS[name]
    trace_id, gateway, server, spans = _spans_of(received, call)
    assert gateway.parent_span_id == b""  # a root span: the trace starts at the gateway
    assert int(trace_id, 16) != 0
    assert trace_id not in {c.trace_id for c in CALLS.values()}
    _assert_gateway_span(gateway, call)
    assert server.trace_id.hex() == trace_id
    assert server.parent_span_id == gateway.span_id
    _assert_tree(spans, gateway, b"")


def test_each_call_is_its_own_trace(received):
    trace_ids = [_spans_of(received, call)[0] for call in CALLS.values()]
    assert len(set(trace_ids)) == len(CALLS)


def test_a_call_by_card_is_one_tree_from_envoy_to_the_audit_write(received):
    """REST through Envoy, scored by card: Envoy's span -> the service's server span -> one child span per step,
    each carrying what it worked on (model, version, batch size, the card)."""
    call = CALLS["rest-card"]
    _, gateway, server, spans = _spans_of(received, call)
    assert server.parent_span_id == gateway.span_id
    children = {s.name: s for svc, s in spans if svc == SERVICE and s.parent_span_id == server.span_id}
    assert set(children) == CARD_CHILDREN, sorted(children)
    assert {s.name for svc, s in spans} == {"ingress", RPC} | CARD_CHILDREN  # nothing else, nothing deeper
    assert _attrs(server)["model.name"] == "fraud" and _attrs(server)["model.version"] == "1"
    assert _attrs(children["features.read"]).items() >= {"features.view": "fraud:card",
                                                          "features.entity": call.card}.items()
    assert _attrs(children["validate"])["model.name"] == "fraud"
    inference = children["model.inference"]
    assert _attrs(inference)["model.name"] == "fraud" and _attrs(inference)["model.version"] == "1"
    assert _ints(inference)["batch.size"] >= 1
    assert _ints(children["cache.get"])["cache.hits"] == 0
    assert _attrs(children["audit.write"])["write_behind.buffer"] == "fraud"
    # the steps run in order; the audit write is flushed after the inference, possibly after the answer
    order = ["features.read", "validate", "cache.get", "batch.queue_wait", "model.inference", "cache.set"]
    for earlier, later in itertools.pairwise(order):
        assert children[earlier].end_time_unix_nano <= children[later].start_time_unix_nano + 1000, (earlier, later)
    assert children["audit.write"].start_time_unix_nano >= inference.end_time_unix_nano
    for name in order:
        assert server.start_time_unix_nano <= children[name].start_time_unix_nano
        assert children[name].end_time_unix_nano <= server.end_time_unix_nano
