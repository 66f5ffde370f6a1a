"""Prometheus metrics shared by every service, served on a per-service HTTP port.

Latency buckets resolve p50/p95/p99 between 0.5 ms and 2 s. Names follow
Prometheus conventions (`_total`, `_seconds`); labels are model, version and,
for requests, method and gRPC status.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

log = logging.getLogger(__name__)
disable_created_metrics()  # no `_created` series: they double the scrape for nothing we alert on

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter(
    "inference_requests_total", "RPCs handled, by model, version, method and gRPC status",
    ["model", "version", "method", "status"],
)
REQUEST_LATENCY = Histogram(
    "inference_request_duration_seconds", "RPC latency as seen by the server",
    ["model", "version", "method"], buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("inference_queue_depth", "Requests waiting in the batcher's queue", ["model", "version"])
BATCH_SIZE = Histogram(
    "inference_batch_size", "Rows per inference call", ["model", "version"], buckets=BATCH_SIZE_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "inference_queue_wait_seconds", "Time a request waited in the batcher's queue",
    ["model", "version"], buckets=LATENCY_BUCKETS,
)
INFERENCE_TIME = Histogram(
    "inference_compute_duration_seconds", "Runtime time per batch", ["model", "version"], buckets=LATENCY_BUCKETS,
)
REJECTED = Counter(
    "inference_rejected_total", "Requests the batcher refused or dropped, by reason",
    ["model", "version", "reason"],
)
CACHE = Counter("inference_cache_total", "Prediction cache lookups per row, by result", ["model", "result"])
BREAKER_STATE = Gauge(
    "inference_circuit_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open", ["breaker"],
)
FALLBACKS = Counter("inference_fallback_total", "Rows answered by the model's fallback", ["model", "version"])
MODEL_READY = Gauge("inference_model_ready", "1 when the model is loaded and warmed up", ["model", "version"])
MODEL_INFO = Gauge(
    "inference_model_info", "Served model: platform, device and the runtime providers actually in use",
    ["model", "version", "platform", "device", "providers"],
)
MODEL_LOADS = Counter(
    "inference_model_loads_total",
    "Version bring-ups (load, warm-up, calibration) by outcome; a failure names the stage that failed",
    ["model", "version", "outcome", "stage"],
)
MODEL_UNLOADS = Counter("inference_model_unloads_total", "Versions retired (after their in-flight requests)",
                        ["model", "version"])
MODEL_VARIANT = Gauge(
    "inference_model_variant",
    "Runtime variant served (1): its backend and device, and how it was chosen: auto (hardware and build "
    "measurements), config or override",
    ["model", "version", "variant", "backend", "device", "selection"],
)
BATCH_POSITIONS = Counter(
    "inference_batch_sequence_positions_total",
    "Sequence positions in batches of variable-length inputs: real tokens, padded (computed), and unsplit "
    "(what one FIFO batch padded to its longest member would have computed)",
    ["model", "version", "kind"],
)
PADDING_ROWS = Counter(
    "inference_batch_padding_rows_total",
    "Rows added to batches to pad them up to a preferred batch size (batching.pad_to_preferred)",
    ["model", "version"],
)
GPU_MEMORY = Gauge("inference_gpu_memory_used_bytes", "GPU memory in use", ["gpu"])

BREAKER_STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serve `/metrics` on `port` (0: disabled). Returns the port, 0 when disabled."""
    if port == 0:
        return 0
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound = server.server_address[1]
    log.info("prometheus metrics on http://%s:%d/metrics", host, bound)
    register_gpu_memory_collector()
    return bound


def register_gpu_memory_collector() -> bool:
    """Export GPU memory in use when NVML (`nvidia-ml-py`) finds a GPU; False otherwise."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # no NVML library, no driver or no GPU: nothing to export
        return False
    for i in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        GPU_MEMORY.labels(gpu=str(i)).set_function(lambda h=handle: pynvml.nvmlDeviceGetMemoryInfo(h).used)
    return count > 0
