"""mlplatform.lifecycle.ModelManager over a real on-disk repository: version policies, atomic swaps that let
in-flight requests finish on the old version, failed loads that keep the served version, unload, poll mode,
and the control-mode and override checks of the repository API."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from mlplatform.config import VersionPolicy
from mlplatform.dataplane import DataPlane
from mlplatform.errors import InvalidInputError, ModelNotReadyError, NotFoundError
from mlplatform.lifecycle import (
    ControlMode,
    ControlRefusedError,
    LoadFailedError,
    ModelManager,
    State,
    parse_config_override,
)
from mlplatform.model import Model
from mlplatform.repository import ModelRepository
from mlplatform.server import build_predictor
from mlplatform.settings import ServiceSettings, SettingsError, load_settings
from tests.libs.helpers import wait_until

GATES: dict[int, threading.Event] = {}
"""Per version: when set for a version, its batches wait on it (a request held in flight)."""


class ScaleModel(Model):
    """y = x.sum(axis=1) * factor, the factor read from the version's artifact; a negative factor fails
    warm-up (a version that loads but cannot infer)."""

    def _load(self) -> None:
        self.factor = float(np.load(self.model_version.artifact_path))

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate = GATES.get(int(self.version))
        if gate is not None:
            gate.wait(10)
        if self.factor < 0:
            raise RuntimeError("negative factor")
        return {"y": (inputs["x"].sum(axis=1) * self.factor).astype(np.float32)}

    async def unload(self) -> None:
        await super().unload()
        self.__dict__.pop("factor", None)


def publish(root: Path, version: int, factor: float | None = None, policy: dict | None = None) -> Path:
    """Write version `version` of model `scale` (factor: 10 x version unless given), as a real build would."""
    folder = root / "scale" / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "factor.npy", np.float32(10 * version if factor is None else factor))
    config = {
        "name": "scale", "version": version, "platform": "numpy", "artifact": "factor.npy",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
        # inline_below_ms 0: a batch held at its gate waits in a worker thread, not on the event loop.
        "batching": {"max_batch_size": 8, "max_queue_delay_ms": 1.0, "inline_below_ms": 0},
        "warmup": {"batch_sizes": [1], "iterations": 1},
    }
    if policy is not None:
        config["version_policy"] = policy
    (folder / "config.json").write_text(json.dumps(config))
    return folder


ROW = np.array([[1, 2, 3, 4]], dtype=np.float32)  # sum 10: version v answers 100 * v


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    publish(tmp_path, 1)
    publish(tmp_path, 2)
    return tmp_path


@pytest.fixture
async def manager(repo: Path):
    managers: list[ModelManager] = []
    changes: list[list[str]] = []

    def make(mode: ControlMode = ControlMode.EXPLICIT, policy: VersionPolicy | None = None) -> ModelManager:
        settings = ServiceSettings(cache_enabled=False, model_repository=repo)
        dataplane = DataPlane()

        async def changed() -> None:
            changes.append(sorted(str(v) for v in dataplane.versions("scale")))

        m = ModelManager(ModelRepository(repo), dataplane,
                         lambda version: build_predictor(ScaleModel(version), settings, None),
                         mode=mode, policy=policy, drain_timeout_s=5, on_change=changed, env_prefix="SCALE_")
        m.changes = changes  # type: ignore[attr-defined]
        managers.append(m)
        return m

    yield make
    for gate in GATES.values():
        gate.set()
    GATES.clear()
    for m in managers:
        await m.close()


async def answer(dataplane: DataPlane, version: str = "") -> tuple[str, float]:
    """One request through the data plane: the version that answered and its output."""
    with dataplane.serving("scale", version) as predictor:
        prediction = await dataplane.infer(predictor, {"x": ROW})
    return predictor.model.version, float(prediction.outputs["y"][0])


def loads(outcome: str, version: str) -> float:
    return REGISTRY.get_sample_value("inference_model_loads_total", {
        "model": "scale", "version": version, "outcome": outcome,
        "stage": "ready" if outcome == "success" else "warmup"}) or 0.0


async def test_the_default_policy_serves_the_newest_version_only(manager):
    m = manager()
    await m.load("scale")
    assert sorted(m.dataplane.versions("scale")) == [2]
    assert await answer(m.dataplane) == ("2", 200.0)
    with pytest.raises(NotFoundError, match=r"^model 'scale' has no version '1' served; served version: 2$"):
        await answer(m.dataplane, "1")
    assert [(e.version, e.state) for e in m.index()] == [("2", State.READY)]


async def test_policy_all_serves_versions_side_by_side_and_a_request_pins_one(manager):
    m = manager(policy=VersionPolicy.parse("all"))
    await m.load("scale")
    assert await answer(m.dataplane) == ("2", 200.0)
    assert await answer(m.dataplane, "1") == ("1", 100.0)
    assert await answer(m.dataplane, "2") == ("2", 200.0)
    assert m.dataplane.version_ready("scale", "1") and m.dataplane.version_ready("scale")
    assert not m.dataplane.version_ready("scale", "3") and not m.dataplane.version_ready("scale", "x")


async def test_newest_config_decides_the_policy(repo, manager):
    publish(repo, 3, policy={"latest": {"num_versions": 2}})
    m = manager()
    await m.load("scale")
    assert sorted(m.dataplane.versions("scale")) == [2, 3]


async def test_a_swap_is_atomic_and_lets_the_request_in_flight_on_the_old_version_finish(manager):
    m = manager()
    await m.load("scale", '{"version_policy": {"specific": {"versions": [1]}}}')
    old = m.dataplane.versions("scale")[1]
    GATES[1] = threading.Event()
    held = asyncio.create_task(answer(m.dataplane))  # resolves v1, then waits in v1's runtime
    await wait_until(lambda: old.in_flight == 1)
    swap = asyncio.create_task(m.load("scale", '{"version_policy": {"specific": {"versions": [2]}}}'))
    await wait_until(lambda: sorted(m.dataplane.versions("scale")) == [2])  # switched: new requests get v2
    assert await answer(m.dataplane) == ("2", 200.0)
    assert not swap.done() and old.batcher.running  # v1 is kept until its request has its answer
    assert [(e.version, e.state) for e in m.index()] == [("1", State.UNLOADING), ("2", State.READY)]
    GATES[1].set()
    assert await held == ("1", 100.0)
    await swap
    assert not old.batcher.running and not old.model.ready and not hasattr(old.model, "factor")
    assert [(e.version, e.state, e.reason) for e in m.index()] == [
        ("1", State.UNAVAILABLE, "unloaded"), ("2", State.READY, "")]
    assert m.changes == [["1"], ["2"]]  # health was refreshed once per switch, never with nothing served


async def test_a_version_that_fails_warm_up_leaves_the_served_version_in_place(repo, manager):
    m = manager()
    await m.load("scale")
    publish(repo, 3, factor=-1.0)
    before = loads("failure", "3")
    with pytest.raises(LoadFailedError) as err:
        await m.load("scale")
    assert err.value.code == grpc.StatusCode.INTERNAL
    assert err.value.message == ("failed to load scale v3: negative factor; still serving versions [2]")
    assert loads("failure", "3") == before + 1
    assert await answer(m.dataplane) == ("2", 200.0)
    entry = {e.version: e for e in m.index()}["3"]
    assert entry.state == State.UNAVAILABLE and entry.reason == "warmup failed: negative factor"


async def test_a_version_whose_artifact_is_missing_is_refused_naming_it(repo, manager):
    m = manager()
    await m.load("scale")
    (publish(repo, 3) / "factor.npy").unlink()
    with pytest.raises(LoadFailedError, match=r"artifact 'factor.npy' is missing; still serving versions \[2\]$"):
        await m.load("scale")
    assert await answer(m.dataplane) == ("2", 200.0)


async def test_unload_stops_serving_and_a_later_load_brings_the_model_back(manager):
    m = manager()
    await m.load("scale")
    await m.unload("scale")
    assert m.dataplane.names == [] and not m.dataplane.ready()
    with pytest.raises(ModelNotReadyError, match=r"^model 'scale' is not loaded"):
        await answer(m.dataplane)
    assert [(e.version, e.state) for e in m.index()] == [("2", State.UNAVAILABLE)]
    assert m.index(ready_only=True) == []
    with pytest.raises(NotFoundError, match=r"^model 'scale' is not loaded; loaded: \[\]$"):
        await m.unload("scale")
    await m.load("scale")
    assert await answer(m.dataplane) == ("2", 200.0)


async def test_a_policy_that_selects_nothing_is_not_found_and_changes_nothing(manager):
    m = manager()
    await m.load("scale")
    with pytest.raises(NotFoundError, match=r"no version under .* matches its version policy \(specific \[7\]\); "
                                            r"versions there: \[1, 2\]$"):
        await m.load("scale", '{"version_policy": {"specific": {"versions": [7]}}}')
    assert await answer(m.dataplane) == ("2", 200.0)


async def test_poll_brings_up_new_folders_and_retires_removed_ones_and_skips_a_broken_one(repo, manager):
    m = manager(mode=ControlMode.POLL)
    await m.load("scale")
    await m.poll_once()
    assert sorted(m.dataplane.versions("scale")) == [2]
    publish(repo, 3)
    await m.poll_once()
    assert await answer(m.dataplane) == ("3", 300.0)
    shutil.rmtree(repo / "scale" / "3")
    await m.poll_once()
    assert await answer(m.dataplane) == ("2", 200.0)
    publish(repo, 4, factor=-1.0)
    before = loads("failure", "4")
    await m.poll_once()
    await m.poll_once()  # unchanged files: not retried
    assert loads("failure", "4") == before + 1
    assert await answer(m.dataplane) == ("2", 200.0)
    publish(repo, 4, factor=40.0)  # fixed in place: retried
    await m.poll_once()
    assert await answer(m.dataplane) == ("4", 400.0)


@pytest.mark.parametrize(("mode", "why"), [(ControlMode.NONE, "models load once at start"),
                                           (ControlMode.POLL, "the repository decides")])
def test_the_api_is_refused_unless_explicit(manager, mode, why):
    with pytest.raises(ControlRefusedError) as err:
        manager(mode=mode).check_control("RepositoryModelLoad")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.message.startswith(f"RepositoryModelLoad is not allowed in model control mode '{mode.value}'")
    assert why in err.value.message and err.value.message.endswith(
        "start the service with SCALE_MODEL_CONTROL_MODE=explicit to load and unload models through the API")
    manager(mode=ControlMode.EXPLICIT).check_control("RepositoryModelLoad")


@pytest.mark.parametrize(("text", "message"), [
    ("not json", r"^parameters.config: not JSON"),
    ('{"max_batch_size": 4}', r"only \{\"version_policy\": \.\.\.\} can be overridden at load, got "
                              r"\['max_batch_size'\]"),
    ('{"version_policy": {"latest": {"num_versions": 0}}}', r"^parameters.config.version_policy: latest.num_versions"),
    ('{"version_policy": {"all": {}, "latest": {}}}', r"give one of latest, all, specific"),
])
def test_a_bad_config_override_is_invalid_argument_naming_the_field(text, message):
    with pytest.raises(InvalidInputError, match=message):
        parse_config_override(text)


def test_version_policy_select_and_parse():
    assert VersionPolicy().select([3, 1, 2]) == [3]
    assert VersionPolicy.parse("latest:2").select([1, 2, 3]) == [2, 3]
    assert VersionPolicy.parse("all").select([2, 1]) == [1, 2]
    assert VersionPolicy.parse("specific:1,4").select([1, 2, 3]) == [1]
    assert VersionPolicy.parse('{"specific": {"versions": [2]}}').describe() == "specific [2]"
    with pytest.raises(ValueError, match=r"^invalid version policy 'newest'"):
        VersionPolicy.parse("newest")


def test_settings_pin_and_policy_are_exclusive_and_validated(monkeypatch):
    assert load_settings(ServiceSettings, model_version=2).served_policy().describe() == "specific [2]"
    assert load_settings(ServiceSettings, version_policy="latest:2").served_policy().describe() == "latest 2"
    assert load_settings(ServiceSettings).served_policy() is None
    with pytest.raises(SettingsError, match=r"model_version .* and version_policy .* both choose versions"):
        load_settings(ServiceSettings, model_version=2, version_policy="all")
    with pytest.raises(SettingsError, match="VERSION_POLICY"):
        load_settings(ServiceSettings, version_policy="newest")
    with pytest.raises(SettingsError, match="MODEL_CONTROL_MODE"):
        load_settings(ServiceSettings, model_control_mode="auto")
