"""mlplatform.faults: the control file switches faults on a running injector, a real DynamicBatcher turns an
injected failure into the request's InferenceError and a slow-down into latency, the CLI writes the file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlplatform import faults
from mlplatform.batching import DynamicBatcher
from mlplatform.errors import InferenceError


def double(inputs):
    return {"y": inputs["x"] * 2}


@pytest.fixture
def control(tmp_path: Path) -> Path:
    return tmp_path / "faults.json"


def test_no_file_or_no_entry_means_no_fault(control):
    injector = faults.FaultInjector(control, poll_s=0)
    assert injector.fault("m") is None
    faults.set_fault(control, "other", faults.Fault(error_rate=1))
    assert injector.fault("m") is None and injector.fault("other") == faults.Fault(error_rate=1)
    assert injector.run("m", lambda a: a + 1, 1) == 2


def test_the_file_switches_faults_on_and_off_while_running(control):
    injector = faults.FaultInjector(control, poll_s=0)
    assert injector.run("m", lambda: "ran") == "ran"
    faults.set_fault(control, "m", faults.Fault(error_rate=1))
    with pytest.raises(faults.FaultInjectedError, match="injected fault: m"):
        injector.run("m", lambda: "ran")
    faults.set_fault(control, faults.ALL, faults.Fault(delay_ms=1))
    faults.clear(control, "m")  # the model's own entry gone: the "*" entry applies
    assert injector.fault("m") == faults.Fault(delay_ms=1)
    faults.clear(control)
    assert injector.run("m", lambda: "ran") == "ran" and injector.injected_errors == 1


def test_changes_are_read_at_most_every_poll_interval(control):
    injector = faults.FaultInjector(control, poll_s=0.3)
    assert injector.fault("m") is None
    faults.set_fault(control, "m", faults.Fault(error_rate=1))
    assert injector.fault("m") is None  # not re-read yet
    time.sleep(0.35)
    assert injector.fault("m") == faults.Fault(error_rate=1)


def test_a_fault_ends_at_its_until(control):
    injector = faults.FaultInjector(control, poll_s=0)
    faults.set_fault(control, "m", faults.Fault(error_rate=1, until=time.time() + 0.3))
    assert injector.fault("m") is not None
    time.sleep(0.35)
    assert injector.fault("m") is None


def test_error_rate_is_a_share_of_calls(control):
    import random

    injector = faults.FaultInjector(control, poll_s=0, rng=random.Random(1))
    faults.set_fault(control, "m", faults.Fault(error_rate=0.25))
    failed = 0
    for _ in range(2000):
        try:
            injector.run("m", lambda: None)
        except faults.FaultInjectedError:
            failed += 1
    assert 400 < failed < 600


def test_delay_and_slowdown_factor(control):
    injector = faults.FaultInjector(control, poll_s=0)
    faults.set_fault(control, "m", faults.Fault(delay_ms=50))
    t0 = time.perf_counter()
    injector.run("m", lambda: None)
    assert time.perf_counter() - t0 >= 0.05
    faults.set_fault(control, "m", faults.Fault(delay_factor=5))
    t0 = time.perf_counter()
    injector.run("m", time.sleep, 0.02)  # a 20 ms call taking 5x: 100 ms
    assert time.perf_counter() - t0 >= 0.1


@pytest.mark.parametrize(("content", "problem"), [
    ("not json", "Expecting value"),
    ('{"m": {"delay": 1}}', "m: unknown field(s) ['delay']"),
    ('{"m": {"error_rate": 2}}', "m: error_rate must be between 0 and 1"),
    ('{"m": {"delay_factor": 0.5}}', "m: delay_factor must be >= 1"),
    ('[1]', "JSON object"),
])
def test_an_invalid_file_is_logged_and_means_no_fault(control, caplog, content, problem):
    faults.set_fault(control, "m", faults.Fault(error_rate=1))
    injector = faults.FaultInjector(control, poll_s=0)
    assert injector.fault("m") is not None
    control.write_text(content)
    assert injector.fault("m") is None
    assert problem in caplog.text


def test_off_unless_the_environment_names_a_file(control):
    code = ("import mlplatform.faults as f, sys; sys.stdout.write(repr(f.INJECTOR and str(f.INJECTOR.path)))")
    env_off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={"PATH": "/usr/bin", faults.ENV: ""}, check=True)
    env_on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PATH": "/usr/bin", faults.ENV: str(control)}, check=True)
    assert (env_off.stdout, env_on.stdout) == ("None", repr(str(control)))


async def test_a_batcher_fails_the_request_and_feels_the_delay(control, monkeypatch):
    """Through a real DynamicBatcher (the hook in its runtime call): INTERNAL for the request, latency added."""
    monkeypatch.setattr(faults, "INJECTOR", faults.FaultInjector(control, poll_s=0))
    batcher = DynamicBatcher(double, max_batch_size=8, max_queue_delay_s=0.001, max_queue_size=64, model="m")
    await batcher.start()
    try:
        x = {"x": np.ones((1, 2), np.float32)}
        assert (await batcher.submit(x)).outputs["y"].tolist() == [[2.0, 2.0]]
        faults.set_fault(control, "m", faults.Fault(error_rate=1))
        with pytest.raises(InferenceError, match="FaultInjectedError: injected fault: m") as info:
            await batcher.submit(x)
        assert info.value.code.name == "INTERNAL"
        faults.set_fault(control, "m", faults.Fault(delay_ms=100))
        t0 = time.perf_counter()
        assert (await batcher.submit(x)).outputs["y"].tolist() == [[2.0, 2.0]]
        assert time.perf_counter() - t0 >= 0.1
        faults.set_fault(control, "other-model", faults.Fault(error_rate=1))
        faults.clear(control, "m")
        assert (await batcher.submit(x)).outputs["y"].tolist() == [[2.0, 2.0]]
    finally:
        await batcher.stop()


def test_cli_sets_shows_and_clears(control):
    def cli(*args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "mlplatform.faults", "--file", str(control), *args],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    shown = cli("set", "fraud", "--delay-factor", "10", "--for", "20")
    assert shown["fraud"]["delay_factor"] == 10 and 19 < shown["fraud"]["until"] - time.time() <= 20
    assert set(cli("set", "*", "--error-rate", "1")) == {"fraud", "*"}
    assert set(cli("clear", "fraud")) == {"*"} and cli("clear") == {} and cli("show") == {}
    bad = subprocess.run([sys.executable, "-m", "mlplatform.faults", "--file", str(control), "set", "m",
                          "--error-rate", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error_rate must be between 0 and 1" in bad.stderr
