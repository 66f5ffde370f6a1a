"""mlplatform.build: the shared build command line (options, version check, exit status) and atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlplatform.build import BuildError, build_arg_parser, run_build, write_version


def test_parser_has_the_common_options_with_the_scripts_seed():
    parser = build_arg_parser("python -m x.build_model", "Build x.\n\nDetails.", seed=7)
    args = parser.parse_args(["--repository", "repo"])
    assert (args.repository, args.version, args.seed, args.force) == (Path("repo"), 1, 7, False)
    assert parser.description == "Build x."
    args = parser.parse_args(["--repository", "r", "--version", "3", "--seed", "1", "--force"])
    assert (args.version, args.seed, args.force) == (3, 1, True)


@pytest.mark.parametrize("version", ["0", "-2"])
def test_version_below_one_is_refused_naming_it(version, capsys):
    parser = build_arg_parser("build", None, seed=1)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--repository", "r", "--version", version])
    assert exc.value.code == 2
    assert f"argument --version: must be >= 1, got {version}" in capsys.readouterr().err


def test_run_build_exit_status_and_reason(capsys):
    assert run_build(lambda: None) == 0

    def failing() -> None:
        raise BuildError("ONNX parity 0.3 over tolerance 1e-4")

    assert run_build(failing) == 1
    assert capsys.readouterr().err == "build failed: ONNX parity 0.3 over tolerance 1e-4\n"
    with pytest.raises(KeyError):  # anything else is a bug, not a failed build: it propagates
        run_build(lambda: {}["x"])


def test_write_version_replaces_an_existing_version_whole(tmp_path: Path):
    write_version(tmp_path / "m", 1, {"a.txt": b"old", "stale.txt": b"x"})
    target = write_version(tmp_path / "m", 1, {"a.txt": b"new"})
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert (target / "a.txt").read_bytes() == b"new"
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]  # no temp dirs left behind
