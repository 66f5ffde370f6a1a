"""Server bootstrap shared by every model service.

Lifecycle: listen (health NOT_SERVING) -> load -> warm-up -> start the batcher ->
SERVING. On SIGTERM/SIGINT: health NOT_SERVING, optional drain delay so load
balancers notice, then stop accepting calls and let in-flight ones finish within
the grace period, then stop the batcher and unload. SIGUSR1 drains without stopping:
health turns NOT_SERVING for good while calls are still answered, so a supervisor can
wait until the load balancer has taken the process out of rotation before its SIGTERM
(which then skips the drain delay).

A service provides its settings class, a model factory and (optionally) its typed API;
this module adds the data plane, health, reflection, the Open Inference Protocol
servicer, metrics and tracing. One process may serve several models (the generic
model service does): each gets its own batcher and breaker, they share the cache.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mlplatform import metrics, server_tls, tracing
from mlplatform.batching import DynamicBatcher
from mlplatform.breaker import Breaker
from mlplatform.cache import LRUCache, PredictionCache, RedisCache
from mlplatform.dataplane import DataPlane
from mlplatform.interceptors import MetricsInterceptor
from mlplatform.lifecycle import ControlMode, ModelManager
from mlplatform.model import Model
from mlplatform.pipeline import NOT_MODEL_FAILURES, Predictor
from mlplatform.repository import ModelRepository, ModelVersion
from mlplatform.settings import ServiceSettings
from mlplatform.typed import TypedApi

log = logging.getLogger(__name__)

ModelFactory = Callable[[ModelVersion], Model]


@dataclass
class ServiceSpec:
    """What a service plugs into the shared server."""

    name: str
    """Service name for logs and traces, e.g. `fraud`."""
    default_model: str
    """Model served unless settings say otherwise (empty: the settings' `models` list them)."""
    model_factory: ModelFactory
    """Builds the (unloaded) model for a resolved version."""
    settings_cls: type[ServiceSettings] = ServiceSettings
    """The service's settings (its env prefix and default ports)."""
    typed_api: TypedApi | None = None
    """The typed API served beside the Open Inference Protocol (None: OIP only)."""
    lifespan: Callable[[ServiceSettings], AbstractAsyncContextManager[None]] | None = None
    """Service resources held while serving (e.g. fraud's feature store and audit log): entered at start
    before the first request, exited at stop after the last one."""

    def main(self) -> int:
        """Entry point of `python -m <service>`: settings, logging, serve until SIGTERM/SIGINT."""
        return main(self, self.settings_cls)

    @property
    def grpc_service_names(self) -> tuple[str, ...]:
        """Fully-qualified typed service names, for health and reflection."""
        return (self.typed_api.full_name,) if self.typed_api is not None else ()


def build_cache(settings: ServiceSettings) -> PredictionCache | None:
    """Redis when `REDIS_URL` is set, an in-process LRU otherwise, None when the cache is disabled."""
    if not settings.cache_enabled:
        return None
    if settings.redis_url:
        breaker = Breaker("redis", fail_max=settings.breaker_fail_max, reset_timeout_s=settings.breaker_reset_s)
        return RedisCache(settings.redis_url, ttl_s=settings.cache_ttl_s,
                          timeout_s=settings.redis_timeout_ms / 1000, breaker=breaker)
    return LRUCache(settings.cache_max_entries, settings.cache_ttl_s)


def build_predictor(model: Model, settings: ServiceSettings, cache: PredictionCache | None) -> Predictor:
    """The model behind its own batcher (the config's knobs) and circuit breaker, sharing `cache`."""
    cfg = model.config.batching
    batcher = DynamicBatcher(
        model.infer,
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_s=cfg.max_queue_delay_ms / 1000,
        max_queue_size=cfg.max_queue_size,
        max_concurrent_batches=cfg.max_concurrent_batches,
        model=model.name,
        version=model.version,
        lengths_of=model.sequence_lengths if model.variable_length else None,
        group_overhead=cfg.length_group_overhead,
        latency_budget_s=(settings.latency_budget_ms or cfg.latency_budget_ms or 0) / 1000 or None,
        inline_below_s=cfg.inline_below_ms / 1000,
    )
    breaker = Breaker(f"model-{model.name}", fail_max=settings.breaker_fail_max,
                      reset_timeout_s=settings.breaker_reset_s, exclude=NOT_MODEL_FAILURES)
    return Predictor(model, batcher, breaker=breaker, cache=cache)


class ModelServer:
    """Models behind a grpc.aio server with the data plane, health, reflection, OIP, metrics and tracing."""

    def __init__(self, spec: ServiceSpec, settings: ServiceSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.names = settings.served_models(spec.default_model)
        if not self.names:
            raise ValueError(f"{spec.name}: no model to serve (set the service's MODELS setting)")
        if settings.model_version is not None and len(self.names) > 1:
            raise ValueError(f"{spec.name}: MODEL_VERSION pins one model's version; this process serves "
                             f"{self.names} (use VERSION_POLICY)")
        self.repository = ModelRepository(settings.model_repository)
        self.cache = build_cache(settings)
        self.dataplane = DataPlane()
        typed = spec.typed_api is not None
        self.manager = ModelManager(
            self.repository, self.dataplane,
            lambda version: build_predictor(spec.model_factory(version), settings, self.cache),
            mode=ControlMode(settings.model_control_mode), policy=settings.served_policy(),
            loadable=(lambda name: name in self.names) if typed else (lambda name: True),
            warmup_iterations=settings.warmup_iterations, drain_timeout_s=max(settings.grace_period_s, 1.0),
            on_change=self._refresh_health, env_prefix=settings.model_config.get("env_prefix", ""),
        )
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.health_server: grpc.aio.Server | None = None
        """grpc.health.v1 alone on a plaintext port (`health_port`), beside a TLS gRPC port."""
        self.health_port = 0
        self.metrics_port = 0
        self._stopping = asyncio.Event()
        self.draining = False
        self._started = False
        self._background: set[asyncio.Task[None]] = set()
        self._resources = AsyncExitStack()

    @property
    def models(self) -> list[Model]:
        """Every version served now, of every model."""
        return [p.model for name in self.dataplane.names for p in self.dataplane.versions(name).values()]

    @property
    def health_names(self) -> tuple[str, ...]:
        return ("", *self.spec.grpc_service_names, "inference.GRPCInferenceService")

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in self.health_names:
            await self.health.set(name, status)

    async def _refresh_health(self) -> None:
        """After the served versions changed: SERVING while some model is served (and all served are ready)."""
        if self._started:
            serving = self.dataplane.ready()
            await self._set_health(health_pb2.HealthCheckResponse.SERVING if serving
                                   else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def start(self) -> int:
        """Listen (NOT_SERVING), then load and warm up the model, then report SERVING. Returns the port."""
        from inference import grpc_service_pb2_grpc

        from mlplatform.oip import InferenceServicer

        s = self.settings
        interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(self.names[0], "")]
        if tracing.setup_tracing(self.spec.name, s.otel_exporter_otlp_endpoint):
            interceptors.insert(0, tracing.server_interceptor())
        if self.spec.lifespan is not None:
            await self._resources.enter_async_context(self.spec.lifespan(s))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.spec.typed_api is not None:
            self.spec.typed_api.add_to_server(self.server, self.dataplane, self.names[0],
                                              max_stream_in_flight=s.max_stream_in_flight)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane, self.manager, max_stream_in_flight=s.max_stream_in_flight),
            self.server)
        reflection.enable_server_reflection(
            (*self.spec.grpc_service_names, "inference.GRPCInferenceService", reflection.SERVICE_NAME,
             health.SERVICE_NAME),
            self.server,
        )
        address = f"{s.host}:{s.grpc_port}"
        if s.tls_cert_file is not None and s.tls_key_file is not None:
            credentials = server_tls.server_credentials(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        if s.health_port is not None:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{s.host}:{s.health_port}")
            if self.health_port == 0:
                raise RuntimeError(f"could not bind the health port {s.host}:{s.health_port}")
            await self.health_server.start()
        await self.server.start()
        self.metrics_port = metrics.start_metrics_server(s.metrics_port, s.host)
        log.info("%s: gRPC listening on %s:%d%s (NOT_SERVING until warm-up), cache=%s, model control mode %s%s",
                 self.spec.name, s.host, self.port,
                 (" with mutual TLS" if s.tls_client_ca_file else " with TLS") if s.tls else "",
                 self.cache.backend if self.cache is not None else "off", s.model_control_mode,
                 f"; health alone on plaintext port {self.health_port}" if self.health_server else "")
        for name in self.names:
            await self.manager.load(name)
        freeze_heap()
        self._started = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("%s: serving %s (SERVING)", self.spec.name,
                 ", ".join(f"{m.name} v{m.version} on {m.device}" for m in self.models))
        if s.model_control_mode == ControlMode.POLL:
            self._spawn(self.manager.poll_forever(s.repository_poll_s))
        return self.port

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Health NOT_SERVING for good, calls still answered (SIGUSR1): the supervisor's first step of a stop."""
        if not self.draining:
            self.draining = True
            log.info("%s: draining: NOT_SERVING, still answering until SIGTERM", self.spec.name)
            await self.health.enter_graceful_shutdown()

    def request_drain(self) -> None:
        """Signal handler of SIGUSR1: `drain` on the event loop."""
        self._spawn(self.drain())

    def request_stop(self) -> None:
        """Ask the server to shut down gracefully (signal handler)."""
        self._stopping.set()

    async def wait_and_stop(self) -> None:
        """Block until `request_stop`, then shut down gracefully."""
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        """Health NOT_SERVING, drain in-flight requests within the grace period, release everything."""
        s = self.settings
        log.info("%s: shutting down: NOT_SERVING, draining for up to %.1fs", self.spec.name, s.grace_period_s)
        drained = self.draining
        await self.drain()
        if s.drain_delay_s > 0 and not drained:  # after SIGUSR1 the supervisor already waited
            await asyncio.sleep(s.drain_delay_s)
        if self.server is not None:
            await self.server.stop(s.grace_period_s)
        if self.health_server is not None:
            await self.health_server.stop(0)
        for task in list(self._background):
            task.cancel()
        await self.manager.close()
        await self._resources.aclose()
        if self.cache is not None:
            await self.cache.close()
        tracing.shutdown_tracing()
        log.info("%s: stopped", self.spec.name)


def freeze_heap() -> None:
    """Move everything alive after start-up (modules, runtimes, models) out of the garbage collector's
    reach. A full collection walks every tracked object: 40-50 ms with a model loaded, a stall of the
    event loop every few thousand requests, longer than fraud's whole latency budget. Frozen, the
    periodic collections only walk what requests allocated (`gc.freeze`)."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info("froze %d start-up objects out of the garbage collector's scans (%.0f ms)", gc.get_freeze_count(),
             (time.perf_counter() - started) * 1000)


def configure_logging(level: str) -> None:
    """Plain, timestamped log lines on stderr."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def serve(spec: ServiceSpec, settings: ServiceSettings) -> None:
    """Run a model server until SIGTERM or SIGINT, then shut down gracefully."""
    server = ModelServer(spec, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, server.request_drain)
    start = asyncio.create_task(server.start())
    stop = asyncio.create_task(server._stopping.wait())
    done, _ = await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
    if start in done and start.exception() is not None:
        stop.cancel()
        await server.stop()
        raise start.exception()  # type: ignore[misc]
    await server.wait_and_stop()
    if not start.done():
        start.cancel()


def main(spec: ServiceSpec, settings_cls: type[ServiceSettings]) -> int:
    """Entry point for `python -m <service>`: settings, logging, serve; exit code 2 on bad settings."""
    from mlplatform.settings import SettingsError, load_settings

    try:
        settings = load_settings(settings_cls)
    except SettingsError as exc:
        print(f"{spec.name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve(spec, settings))
    except Exception as exc:
        log.error("%s: failed: %s", spec.name, exc, exc_info=settings.log_level == "DEBUG")
        return 1
    return 0
