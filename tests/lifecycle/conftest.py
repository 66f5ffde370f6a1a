"""A model repository with two versions of every model, for the lifecycle tests.

Version 1 of each model is the project's (`make models`). Version 2 of fraud is a real second build
(another seed and data set, so its answers differ from version 1's); version 2 of cnn, sentiment and
diabetes are version 1's files under a new version number (enough to tell versions apart by label).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MODELS = ("fraud", "cnn", "sentiment", "diabetes")


def relabel(source: Path, target: Path, version: int) -> None:
    """`target` = the files of `source` (linked), with config.json saying `version`."""
    target.mkdir(parents=True)
    for f in source.iterdir():
        if f.name != "config.json":
            (target / f.name).symlink_to(f.resolve())
    config = json.loads((source / "config.json").read_text())
    config["version"] = version
    (target / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def versioned_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<tmp>/<model>/1 (the project's) and <tmp>/<model>/2 for every model; fraud v2 is built for real."""
    from fraud_service.build_model import build

    root = tmp_path_factory.mktemp("versioned-repository")
    for model in MODELS:
        (root / model).mkdir()
        (root / model / "1").symlink_to((model_repository / model / "1").resolve(), target_is_directory=True)
        if model != "fraud":
            relabel(model_repository / model / "1", root / model / "2", 2)
    build(root, version=2, seed=7, rows=20_000)
    return root
