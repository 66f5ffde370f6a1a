"""Service settings from the environment (pydantic-settings).

Each service subclasses `ServiceSettings` with its own env prefix (`FRAUD_`, ...).
Settings shared by the libs keep their conventional, unprefixed names
(`REDIS_URL`, `OTEL_EXPORTER_OTLP_ENDPOINT`). `load_settings` turns a validation
failure into one `SettingsError` line per bad field, so a bad setting stops the
service at start-up with a message naming it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Self, TypeVar

from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mlplatform.config import SpecificVersions, VersionPolicy


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it."""


class ServiceSettings(BaseSettings):
    """Settings every model service has. Subclasses set `model_config['env_prefix']`."""

    model_config = SettingsConfigDict(
        extra="ignore", validate_default=True, use_attribute_docstrings=True, protected_namespaces=()
    )

    host: str = "127.0.0.1"
    """Address the gRPC server binds to (`0.0.0.0` in containers)."""
    grpc_port: int = Field(50051, ge=0, le=65535)
    """gRPC port (0 picks a free one; the bound port is logged)."""
    metrics_port: int = Field(9101, ge=0, le=65535)
    """Port of the Prometheus `/metrics` HTTP endpoint (0 disables it)."""
    model_repository: Path = Path("model_repository")
    """Root of the model repository: `<root>/<model>/<version>/config.json`."""
    model_name: str = ""
    """Model served; defaults to the service's model name."""
    model_version: int | None = Field(None, ge=1)
    """Pin a version (single-model services): the version policy `specific:<version>`."""
    version_policy: str = Field("", pattern=r"^(|latest(:[1-9][0-9]*)?|all|specific:[1-9][0-9]*(,[1-9][0-9]*)*)$")
    """Versions served, for every model of the process: `latest:N`, `all` or `specific:1,3` (Triton's
    version_policy); empty: each model's own (its newest config's `version_policy`, default the latest)."""
    model_control_mode: Literal["none", "poll", "explicit"] = "none"
    """How served versions change after start (Triton's --model-control-mode): `none`, `poll` (new and
    removed version folders are picked up every `repository_poll_s`) or `explicit` (the OIP repository
    API's load / unload, refused in the other modes)."""
    repository_poll_s: float = Field(5.0, gt=0)
    """Poll interval of the model repository in `poll` mode."""
    models: str = Field("", pattern=r"^[A-Za-z0-9_.,-]*$")
    """Models this process serves, comma-separated (the generic model service); empty: `model_name`."""
    tls_cert_file: Path | None = None
    """Server certificate chain (PEM): set, the gRPC port serves TLS only, with `tls_key_file`. The files are
    re-read when they change (a renewed certificate, no restart)."""
    tls_key_file: Path | None = None
    """Private key (PEM) of `tls_cert_file`."""
    tls_client_ca_file: Path | None = None
    """CA certificates (PEM) a client's certificate must chain to: set, the gRPC port requires one (mutual TLS:
    only the gateway, or a caller holding a certificate of the internal CA, reaches the model)."""
    health_port: int | None = Field(None, ge=0, le=65535)
    """A plaintext port serving grpc.health.v1 alone, beside a TLS gRPC port (Kubernetes' gRPC probes and the
    container HEALTHCHECK cannot present a client certificate); unset: none."""
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Maximum gRPC message size, received and sent (gRPC's default is 4 MiB)."""
    grace_period_s: float = Field(10.0, ge=0)
    """On SIGTERM/SIGINT, in-flight requests get this long to finish."""
    drain_delay_s: float = Field(0.0, ge=0)
    """On SIGTERM, keep serving this long after health turns NOT_SERVING (load balancers notice)."""
    max_concurrent_rpcs: int | None = Field(None, ge=1)
    """Cap on concurrent RPCs; beyond it new calls get RESOURCE_EXHAUSTED."""
    latency_budget_ms: float | None = Field(None, gt=0)
    """Override the model config's `batching.latency_budget_ms` (admission control) for the models served."""
    max_stream_in_flight: int = Field(64, ge=1)
    """Messages of one bidi stream scored concurrently before reading pauses."""
    cache_ttl_s: int = Field(3600, ge=1)
    """Time to live of a cached prediction."""
    cache_max_entries: int = Field(100_000, ge=1)
    """Size of the in-process LRU cache used when no Redis is configured."""
    cache_enabled: bool = True
    """Turn the prediction cache off entirely."""
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "redis_url"))
    """Redis for the prediction cache (shared setting `REDIS_URL`); unset: in-process LRU."""
    redis_timeout_ms: float = Field(50.0, gt=0)
    """Socket timeout of a cache call; a slower Redis counts as a failure."""
    breaker_fail_max: int = Field(5, ge=1)
    """Consecutive failures that open a circuit breaker."""
    breaker_reset_s: float = Field(10.0, gt=0)
    """How long a breaker stays open before letting one trial call through."""
    warmup_iterations: int | None = Field(None, ge=1)
    """Override the model config's warm-up iteration count."""
    otel_exporter_otlp_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "otel_exporter_otlp_endpoint")
    )
    """OTLP/gRPC collector for traces (shared setting); unset: tracing is a no-op."""
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    """Python log level."""

    def served_models(self, default: str) -> list[str]:
        """The model names to serve: `models` when set, else `model_name` or the service's `default`."""
        listed = [m.strip() for m in self.models.split(",") if m.strip()]
        return listed or [m for m in [self.model_name or default] if m]

    def served_policy(self) -> VersionPolicy | None:
        """The service-wide version policy (`model_version` pins one version); None: each model's own."""
        if self.model_version is not None:
            return VersionPolicy(specific=SpecificVersions(versions=[self.model_version]))
        return VersionPolicy.parse(self.version_policy) if self.version_policy else None

    @model_validator(mode="after")
    def _one_version_setting(self) -> Self:
        if self.model_version is not None and self.version_policy:
            raise ValueError(f"model_version ({self.model_version}) and version_policy ({self.version_policy!r}) "
                             "both choose versions: set one")
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> Self:
        ports = [(name, port) for name, port in (("grpc_port", self.grpc_port), ("metrics_port", self.metrics_port),
                                                 ("health_port", self.health_port)) if port]
        for i, (name, port) in enumerate(ports):
            for other, other_port in ports[i + 1:]:
                if port == other_port:
                    raise ValueError(f"{name} and {other} are both {port}")
        return self

    @model_validator(mode="after")
    def _tls_files_together(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs the server's own tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file: {path}")
        return self

    @property
    def tls(self) -> bool:
        """Whether the gRPC port serves TLS."""
        return self.tls_cert_file is not None


S = TypeVar("S", bound=ServiceSettings)


def service_settings(env_prefix: str, default_grpc_port: int, default_metrics_port: int, default_model: str = "",
                     base: type[S] = ServiceSettings) -> type[S]:  # type: ignore[assignment]
    """The settings class of one service: `base`'s fields under `env_prefix` (`FRAUD_`), with its default ports
    and model (shared/README conventions). Subclass the result to add service-specific fields."""

    class Settings(base):  # type: ignore[valid-type,misc]
        __doc__ = f"Environment: `{env_prefix}GRPC_PORT`, `{env_prefix}MODEL_REPOSITORY`, ...; shared: `REDIS_URL`."
        model_config = SettingsConfigDict(
            env_prefix=env_prefix, extra="ignore", validate_default=True, use_attribute_docstrings=True,
            protected_namespaces=(),
        )

        grpc_port: int = Field(default_grpc_port, ge=0, le=65535)
        """gRPC port of the service (0 picks a free one)."""
        metrics_port: int = Field(default_metrics_port, ge=0, le=65535)
        """Prometheus port of the service (0 disables it)."""
        model_name: str = default_model
        """Model served."""

    Settings.__name__ = Settings.__qualname__ = f"{env_prefix.strip('_').title()}Settings"
    Settings.__module__ = sys._getframe(1).f_globals["__name__"]  # the service's settings module (healthcheck)
    return Settings


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build settings from the environment; raise `SettingsError` naming each bad field."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            env = f"{prefix}{field}".upper() if field != "settings" else "settings"
            lines.append(f"{env}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid settings: " + "; ".join(lines)) from None
