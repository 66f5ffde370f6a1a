"""Model lifecycle: which versions of each model take traffic, and changing that without downtime.

The `ModelManager` brings versions up and down for the data plane, as Triton's model control does:

- A version's bring-up is load -> warm-up -> calibrate the batcher's service time -> start the batcher,
  all while the versions already served keep serving. Only then is the model's set of versions
  switched, in one assignment (`DataPlane.set_versions`). A version that fails any step is torn
  down and the served set stays as it was, with a log line, `inference_model_loads_total{outcome=
  "failure"}` and its reason in the repository index.
- A version leaving the set is retired after the switch: new requests can no longer resolve it,
  the requests that already hold it finish (`Predictor.wait_idle`), then its batcher stops and its
  runtime is released (memory returned to the OS where the C library allows it).
- Which versions are served follows the model's version policy (`config.VersionPolicy`): the newest
  version's `config.json`, overridden by the service's `<PREFIX>VERSION_POLICY` (or `MODEL_VERSION`
  pin), overridden for one load by the repository API's `config` parameter.

Control modes (`<PREFIX>MODEL_CONTROL_MODE`, as Triton's `--model-control-mode`): `none` loads at
start and never changes; `poll` re-reads the repository every `<PREFIX>REPOSITORY_POLL_S` and brings
new version folders up (and gone ones down); `explicit` changes only through the repository API
(`RepositoryModelLoad` / `RepositoryModelUnload`), which the other modes refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import grpc
from pydantic import ValidationError

from mlplatform import metrics
from mlplatform.config import CONFIG_FILE, VersionPolicy, load_config
from mlplatform.dataplane import DataPlane
from mlplatform.errors import InvalidInputError, NotFoundError, ServingError
from mlplatform.pipeline import Predictor
from mlplatform.repository import ModelRepository, ModelVersion

log = logging.getLogger(__name__)

PredictorFactory = Callable[[ModelVersion], Predictor]
"""Builds the (unloaded) model of a version behind its own batcher and breaker."""


class ControlMode(StrEnum):
    """How the served versions may change after start (Triton's `--model-control-mode`)."""

    NONE = "none"
    POLL = "poll"
    EXPLICIT = "explicit"


class State(StrEnum):
    """A version's state in the repository index (Triton's names)."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index: a model version (version "" for a model with none loaded)."""

    name: str
    version: str
    state: State
    reason: str = ""


class ControlRefusedError(ServingError):
    """The repository API's load / unload is not enabled in this control mode."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class LoadFailedError(ServingError):
    """A version could not be brought up; the versions served before are still served."""

    code = grpc.StatusCode.INTERNAL


def release_memory() -> None:
    """Hand memory freed by an unloaded runtime back to the OS (glibc keeps freed heap pages otherwise)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelManager:
    """Brings model versions up and down for a `DataPlane`; see the module docstring."""

    def __init__(
        self,
        repository: ModelRepository,
        dataplane: DataPlane,
        build: PredictorFactory,
        *,
        mode: ControlMode = ControlMode.NONE,
        policy: VersionPolicy | None = None,
        loadable: Callable[[str], bool] = lambda name: True,
        warmup_iterations: int | None = None,
        drain_timeout_s: float = 30.0,
        on_change: Callable[[], Awaitable[None]] | None = None,
        env_prefix: str = "",
    ) -> None:
        self.repository = repository
        self.dataplane = dataplane
        self.mode = mode
        self._build = build
        self._policy = policy
        self._loadable = loadable
        self._warmup_iterations = warmup_iterations
        self._drain_timeout_s = drain_timeout_s
        self._on_change = on_change
        self._env_prefix = env_prefix
        self._states: dict[str, dict[int, IndexEntry]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._load_overrides: dict[str, VersionPolicy] = {}
        self._failed: dict[tuple[str, int], float] = {}
        """Versions whose bring-up failed, with their files' newest mtime: poll does not retry them unchanged."""
        self.tracked: list[str] = []
        """Models this manager was asked to serve (kept in the index after an unload)."""
        self.swaps = 0

    # -- the repository API ---------------------------------------------------------------

    def check_control(self, what: str) -> None:
        """Refuse a load / unload through the API unless the control mode is explicit."""
        if self.mode == ControlMode.EXPLICIT:
            return
        why = ("the repository decides: publish or remove version folders and they are loaded or unloaded "
               "within the poll interval") if self.mode == ControlMode.POLL else "models load once at start"
        raise ControlRefusedError(
            f"{what} is not allowed in model control mode {self.mode.value!r} ({why}); start the service with "
            f"{self._env_prefix}MODEL_CONTROL_MODE=explicit to load and unload models through the API")

    async def load(self, name: str, config: str | None = None) -> None:
        """Load `name` (or reload it: apply its version policy to the repository as it is now); `config`
        is the API's JSON override, of which only `version_policy` is accepted (for this load and the
        reloads that follow until the next load without it)."""
        if not self._loadable(name):
            raise NotFoundError(f"model {name!r} cannot be served by this service; it serves {self.tracked}")
        if config is not None:
            self._load_overrides[name] = parse_config_override(config)
        else:
            self._load_overrides.pop(name, None)
        if name not in self.tracked:
            self.tracked.append(name)
        if name not in self.dataplane.names:
            version = max(self.wanted(name))
            self.dataplane.unavailable[name] = f"model {name} v{version} is not ready"  # loading
        await self.sync(name)

    async def unload(self, name: str) -> None:
        """Stop serving every version of `name` (in-flight requests finish first)."""
        if name not in self.dataplane.names:
            raise NotFoundError(f"model {name!r} is not loaded; loaded: {self.dataplane.names}")
        async with self._lock(name):
            retiring = self.dataplane.versions(name)
            self.dataplane.set_versions(name, {})
            await self._changed()
            log.info("model %s: unloaded (versions %s)", name, sorted(retiring))
            for version, predictor in retiring.items():
                await self._retire(name, version, predictor)
            self._load_overrides.pop(name, None)
            release_memory()

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every tracked model's versions and their states (a model with none: one row, version "")."""
        out: list[IndexEntry] = []
        for name in sorted({*self.tracked, *self.dataplane.names}):
            states = self._states.get(name, {})
            rows = [states[v] for v in sorted(states)]
            if ready_only:
                rows = [r for r in rows if r.state == State.READY]
            elif not rows:
                rows = [IndexEntry(name, "", State.UNAVAILABLE, "not loaded")]
            out.extend(rows)
        return out

    # -- syncing served versions with the repository --------------------------------------

    def policy(self, name: str) -> VersionPolicy:
        """The version policy in force: the API's override, else the service's, else the newest config's."""
        if name in self._load_overrides:
            return self._load_overrides[name]
        if self._policy is not None:
            return self._policy
        for version in reversed(self.repository.versions(name)):  # the newest config that parses
            try:
                return load_config(self.repository.root / name / str(version) / CONFIG_FILE).version_policy
            except ValueError:
                continue  # its bring-up reports the config error
        return VersionPolicy()

    def wanted(self, name: str) -> list[int]:
        """The versions the policy selects from the repository now; NOT_FOUND when it selects none."""
        available = self.repository.versions(name)
        if not available:
            self.repository.resolve(name)  # raises NOT_FOUND naming the models there and `make models`
        policy = self.policy(name)
        chosen = policy.select(available)
        if not chosen:
            raise NotFoundError(f"model {name!r}: no version under {self.repository.root} matches its version "
                                f"policy ({policy.describe()}); versions there: {available}")
        return chosen

    async def sync(self, name: str, *, polling: bool = False) -> bool:
        """Bring the served versions of `name` to what its policy selects; True when they changed.
        A version that fails to come up leaves the served set unchanged: raised as LoadFailedError,
        or (polling) logged and not retried until its files change."""
        async with self._lock(name):
            wanted = self.wanted(name)
            current = self.dataplane.versions(name)
            to_load = [v for v in wanted if v not in current]
            if polling:
                skipped = [v for v in to_load if self._failed.get((name, v)) == self._fingerprint(name, v)]
                if skipped:
                    return False
            if not to_load and set(wanted) == set(current):
                return False
            started: dict[int, Predictor] = {}
            for version in to_load:
                try:
                    started[version] = await self._bring_up(name, version)
                except Exception as exc:  # any failure of a new version keeps the old ones
                    for v, predictor in started.items():
                        await self._retire(name, v, predictor, reason=f"v{version} failed to load")
                    serving = sorted(current) or "none"
                    self._failed[(name, version)] = self._fingerprint(name, version)
                    raise LoadFailedError(f"failed to load {name} v{version}: {exc}; still serving versions "
                                          f"{serving}") from exc
            served = {v: current.get(v) or started[v] for v in wanted}
            self.dataplane.set_versions(name, served)
            self.swaps += 1
            await self._changed()
            log.info("model %s: serving versions %s (policy: %s)", name, sorted(served),
                     self.policy(name).describe())
            for version, predictor in current.items():
                if version not in served:
                    await self._retire(name, version, predictor)
            release_memory()
            return True

    async def poll_once(self) -> None:
        """One poll of the repository: sync every tracked model; failures are logged, never raised."""
        for name in list(self.tracked):
            try:
                await self.sync(name, polling=True)
            except LoadFailedError as exc:
                log.error("model %s: %s", name, exc.message)
            except (NotFoundError, ValueError) as exc:
                log.error("model %s: repository poll: %s", name, exc)

    async def poll_forever(self, interval_s: float) -> None:
        """Poll the repository every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.poll_once()

    async def close(self) -> None:
        """Retire every served version (at shutdown, after the server stopped taking calls)."""
        for name in self.dataplane.names:
            versions = self.dataplane.versions(name)
            self.dataplane.set_versions(name, {})
            for version, predictor in versions.items():
                await self._retire(name, version, predictor)

    # -- one version up or down -----------------------------------------------------------

    async def _bring_up(self, name: str, version: int) -> Predictor:
        """Load, warm up, calibrate and start one version; on failure tear it down and raise."""
        self._set_state(name, version, State.LOADING)
        stage = "resolve"
        predictor: Predictor | None = None
        try:
            predictor = self._build(self.repository.resolve(name, version))
            model, batcher = predictor.model, predictor.batcher
            stage = "load"
            await model.load()
            batcher.pad_sizes = model.batch_pad_sizes()
            if batcher.pad_sizes:
                log.info("%s v%s: batches padded up to sizes %s on %s", name, version, batcher.pad_sizes,
                         model.device)
            stage = "warmup"
            await model.warmup(self._warmup_iterations)
            stage = "calibrate"
            await batcher.calibrate([model.warmup_inputs(b) for b in sorted({1, model.max_batch_size})])
            await batcher.start()
        except Exception as exc:
            reason = f"{stage} failed: {exc}"
            log.error("model %s v%d failed to come up (%s); the versions served before keep serving", name,
                      version, reason)
            metrics.MODEL_LOADS.labels(model=name, version=str(version), outcome="failure", stage=stage).inc()
            if predictor is not None:
                await predictor.batcher.stop()
                await predictor.model.unload()
            self._set_state(name, version, State.UNAVAILABLE, reason)
            raise
        metrics.MODEL_LOADS.labels(model=name, version=str(version), outcome="success", stage="ready").inc()
        self._set_state(name, version, State.READY)
        self._failed.pop((name, version), None)
        return predictor

    async def _retire(self, name: str, version: int, predictor: Predictor, reason: str = "unloaded") -> None:
        """Wait for the requests holding `predictor`, then stop its batcher and release its runtime."""
        self._set_state(name, version, State.UNLOADING)
        if not await predictor.wait_idle(self._drain_timeout_s):
            log.warning("model %s v%d: %d requests still in flight after %.0f s; unloading anyway", name, version,
                        predictor.in_flight, self._drain_timeout_s)
        await predictor.batcher.stop()
        await predictor.model.unload()
        metrics.MODEL_UNLOADS.labels(model=name, version=str(version)).inc()
        self._set_state(name, version, State.UNAVAILABLE, reason)
        log.info("model %s v%d: unloaded", name, version)

    # -- helpers ----------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _set_state(self, name: str, version: int, state: State, reason: str = "") -> None:
        self._states.setdefault(name, {})[version] = IndexEntry(name, str(version), state, reason)

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    def _fingerprint(self, name: str, version: int) -> float:
        """The newest mtime under a version folder (a changed file makes poll retry a failed version)."""
        folder = self.repository.root / name / str(version)
        try:
            return max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
        except OSError:
            return 0.0


def parse_config_override(text: str) -> VersionPolicy:
    """The API's `config` parameter: a JSON object whose only key is `version_policy`."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"parameters.config: not JSON: {exc}") from None
    if not isinstance(obj, dict) or set(obj) != {"version_policy"}:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise InvalidInputError(f"parameters.config: only {{\"version_policy\": ...}} can be overridden at load, "
                                f"got {keys}; other settings live in the version's {CONFIG_FILE}")
    try:
        return VersionPolicy.model_validate(obj["version_policy"])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'version_policy'}: {e['msg']}"
                             for e in exc.errors())
        raise InvalidInputError(f"parameters.config.version_policy: {problems}") from None


def repository_matches(root: Path, requested: str) -> bool:
    """A request's `repository_name` names this repository (empty: the only one)."""
    return requested in ("", root.name, str(root))
