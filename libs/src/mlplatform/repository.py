"""The model repository on disk: which versions exist, which one is served.

Layout: `<root>/<model>/<version>/config.json` plus the artifact it names
(e.g. `model.onnx`). Versions are positive integers; the newest is served unless
a version is pinned. The config file's schema is `mlplatform.config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlplatform.config import CONFIG_FILE, ModelConfig, load_config
from mlplatform.errors import NotFoundError


@dataclass(frozen=True)
class ModelVersion:
    """A resolved model version: its directory and parsed config."""

    path: Path
    config: ModelConfig

    @property
    def artifact_path(self) -> Path:
        return self.path / self.config.artifact


class ModelRepository:
    """Reads `<root>/<model>/<version>/` directories."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self, model: str) -> list[int]:
        """Versions of `model` that have a config file, ascending."""
        model_dir = self.root / model
        if not model_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in model_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / CONFIG_FILE).is_file()
        )

    def resolve(self, model: str, version: int | None = None) -> ModelVersion:
        """The pinned `version`, or the newest one; raise NotFoundError or ValueError (bad config)."""
        available = self.versions(model)
        if not available:
            models = sorted(p.name for p in self.root.iterdir() if self.versions(p.name)) if self.root.is_dir() else []
            raise NotFoundError(f"model {model!r} has no versions under {self.root}; available models: {models} "
                                "(run `make models`)")
        chosen = version if version is not None else available[-1]
        if chosen not in available:
            raise NotFoundError(f"model {model!r} has no version {chosen}; available: {available}")
        path = self.root / model / str(chosen)
        config = load_config(path / CONFIG_FILE)
        if config.name != model or config.version != chosen:
            raise ValueError(f"{path / CONFIG_FILE}: says {config.name!r} v{config.version}, "
                             f"but lives at {model}/{chosen}")
        if not (path / config.artifact).is_file():
            raise ValueError(f"{path / CONFIG_FILE}: artifact {config.artifact!r} is missing")
        return ModelVersion(path=path, config=config)
