"""mlplatform.settings: per-service env prefix, shared unprefixed settings, errors naming the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic_settings import SettingsConfigDict

from mlplatform.settings import ServiceSettings, SettingsError, load_settings


class TestServiceSettings(ServiceSettings):
    """A service's settings, as a service would declare them."""

    __test__ = False  # not a pytest test class
    model_config = SettingsConfigDict(env_prefix="TESTSVC_")

    threshold: float = 0.5


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No TESTSVC_*, REDIS_URL or OTEL_* variables leak in from the environment running the tests."""
    for name in list(os.environ):
        if name.upper().startswith(("TESTSVC_", "REDIS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT")):
            monkeypatch.delenv(name)


def test_defaults():
    s = load_settings(TestServiceSettings)
    assert (s.host, s.grpc_port, s.metrics_port) == ("127.0.0.1", 50051, 9101)
    assert s.model_repository == Path("model_repository")
    assert s.model_version is None
    assert s.redis_url is None
    assert s.otel_exporter_otlp_endpoint is None
    assert s.cache_enabled is True
    assert s.threshold == 0.5


def test_prefixed_variables_are_read(monkeypatch):
    monkeypatch.setenv("TESTSVC_GRPC_PORT", "6000")
    monkeypatch.setenv("TESTSVC_METRICS_PORT", "6001")
    monkeypatch.setenv("TESTSVC_MODEL_REPOSITORY", "/srv/models")
    monkeypatch.setenv("TESTSVC_MODEL_VERSION", "3")
    monkeypatch.setenv("TESTSVC_CACHE_ENABLED", "false")
    monkeypatch.setenv("TESTSVC_BREAKER_RESET_S", "2.5")
    monkeypatch.setenv("TESTSVC_THRESHOLD", "0.25")
    monkeypatch.setenv("TESTSVC_LOG_LEVEL", "DEBUG")

    s = load_settings(TestServiceSettings)

    assert (s.grpc_port, s.metrics_port) == (6000, 6001)
    assert s.model_repository == Path("/srv/models")
    assert s.model_version == 3
    assert s.cache_enabled is False
    assert s.breaker_reset_s == 2.5
    assert s.threshold == 0.25
    assert s.log_level == "DEBUG"


def test_unprefixed_variables_do_not_configure_the_service(monkeypatch):
    monkeypatch.setenv("GRPC_PORT", "7000")
    monkeypatch.setenv("OTHERSVC_GRPC_PORT", "7001")
    assert load_settings(TestServiceSettings).grpc_port == 50051


def test_shared_settings_are_read_unprefixed(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/2")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    s = load_settings(TestServiceSettings)
    assert s.redis_url == "redis://cache:6379/2"
    assert s.otel_exporter_otlp_endpoint == "http://collector:4317"


def test_shared_settings_ignore_the_prefixed_spelling(monkeypatch):
    monkeypatch.setenv("TESTSVC_REDIS_URL", "redis://wrong:6379/0")
    assert load_settings(TestServiceSettings).redis_url is None


def test_overrides_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("TESTSVC_GRPC_PORT", "6000")
    assert load_settings(TestServiceSettings, grpc_port=0).grpc_port == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TESTSVC_GRPC_PORT", "not-a-port"),
        ("TESTSVC_GRPC_PORT", "70000"),
        ("TESTSVC_METRICS_PORT", "-1"),
        ("TESTSVC_MODEL_VERSION", "0"),
        ("TESTSVC_BREAKER_FAIL_MAX", "0"),
        ("TESTSVC_REDIS_TIMEOUT_MS", "0"),
        ("TESTSVC_LOG_LEVEL", "LOUD"),
        ("TESTSVC_THRESHOLD", "high"),
        ("TESTSVC_CACHE_ENABLED", "perhaps"),
        ("TESTSVC_LATENCY_BUDGET_MS", "0"),
        ("TESTSVC_LATENCY_BUDGET_MS", "soon"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as err:
        load_settings(TestServiceSettings)
    message = str(err.value)
    assert message.startswith("invalid settings: ")
    assert variable in message
    assert repr(value) in message  # the offending input is shown
    assert isinstance(err.value, ValueError)


def test_every_bad_field_is_reported(monkeypatch):
    monkeypatch.setenv("TESTSVC_GRPC_PORT", "x")
    monkeypatch.setenv("TESTSVC_CACHE_TTL_S", "0")
    with pytest.raises(SettingsError) as err:
        load_settings(TestServiceSettings)
    assert "TESTSVC_GRPC_PORT" in str(err.value)
    assert "TESTSVC_CACHE_TTL_S" in str(err.value)


def test_equal_grpc_and_metrics_ports_are_refused(monkeypatch):
    monkeypatch.setenv("TESTSVC_GRPC_PORT", "8000")
    monkeypatch.setenv("TESTSVC_METRICS_PORT", "8000")
    with pytest.raises(SettingsError, match="grpc_port and metrics_port are both 8000"):
        load_settings(TestServiceSettings)


def test_both_ports_zero_is_allowed(monkeypatch):
    """0 means "pick a free port" for gRPC and "disabled" for metrics: no clash."""
    monkeypatch.setenv("TESTSVC_GRPC_PORT", "0")
    monkeypatch.setenv("TESTSVC_METRICS_PORT", "0")
    s = load_settings(TestServiceSettings)
    assert (s.grpc_port, s.metrics_port) == (0, 0)
