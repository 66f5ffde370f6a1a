"""The one list of services and models (`deploy/services.yaml`), read by everything that needs it:
`make run` (scripts/run_local.py), `make models`, the gateway's routes, the manifests, the tests
and the bench.

    python -m deploy.catalog build --repository model_repository   # build every model (make models)
    python -m deploy.catalog models                                 # list them

A typed service builds its model with `python -m <build>`; a config-only model `<name>` listed
under a service's `models` is built by `models/<name>/build.py`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICES_FILE = ROOT / "deploy" / "services.yaml"
MODELS_DIR = ROOT / "models"
HEALTH_PORT_OFFSET = 50
"""With mutual TLS, a service's plaintext health-only port (`<PREFIX>HEALTH_PORT`: the kubelet's gRPC probes and
the container HEALTHCHECK cannot present a client certificate) is its gRPC port + 50: fraud 50101, cnn 50102,
sentiment 50103, generic 50104 (`MTLS=1 make run`: each slot's port + 50; Kubernetes: the mtls component)."""


@dataclass(frozen=True)
class Service:
    """One model service as deployed: its module, env prefix, ports, gRPC service and models."""

    name: str
    module: str
    env_prefix: str
    grpc_service: str
    grpc_port: int
    metrics_port: int
    streaming_methods: tuple[str, ...]
    models: tuple[str, ...]
    build: str | None = None
    """`python -m <build> --repository R` builds this typed service's model (None: config-only models)."""

    @classmethod
    def from_entry(cls, name: str, s: dict[str, Any]) -> Service:
        """The service of one `services.<name>` entry of deploy/services.yaml."""
        return cls(
            name=name, module=s["module"], env_prefix=s["env_prefix"], grpc_service=s["grpc_service"],
            grpc_port=int(s["grpc_port"]), metrics_port=int(s["metrics_port"]),
            streaming_methods=tuple(s.get("streaming_methods", ["StreamPredict"])),
            models=tuple(s.get("models") or [name]), build=s.get("build"),
        )

    @property
    def config_only(self) -> bool:
        """Serves config-only models (the generic model service): they are listed in the MODELS setting."""
        return self.build is None

    def env(self) -> dict[str, str]:
        """Settings the service needs beyond its defaults (the generic service: which models)."""
        return {f"{self.env_prefix}MODELS": ",".join(self.models)} if self.config_only else {}

    def build_commands(self, python: str, repository: Path) -> list[list[str]]:
        """The commands that build this service's models into `repository` (each skips what exists)."""
        if self.build is not None:
            return [[python, "-m", self.build, "--repository", str(repository)]]
        return [[python, str(MODELS_DIR / m / "build.py"), "--repository", str(repository)] for m in self.models]


def load(path: Path = SERVICES_FILE) -> dict[str, Any]:
    """deploy/services.yaml as it is: {namespace, image_registry, ..., services: {name: {...}}}."""
    return yaml.safe_load(path.read_text())


def services(path: Path = SERVICES_FILE) -> list[Service]:
    """Every service of the list, in its order."""
    return [Service.from_entry(name, s) for name, s in load(path)["services"].items()]


def models(path: Path = SERVICES_FILE) -> dict[str, Service]:
    """Model name -> the service that serves it."""
    return {m: svc for svc in services(path) for m in svc.models}


def build_all(repository: Path, python: str = sys.executable, path: Path = SERVICES_FILE) -> None:
    """Build every model of the list (deterministic; versions already built are skipped)."""
    for svc in services(path):
        for command in svc.build_commands(python, repository):
            print("+", " ".join(command), flush=True)
            subprocess.run(command, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    """Command line: `build --repository R` or `models`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build every model into the repository")
    build.add_argument("--repository", type=Path, required=True)
    sub.add_parser("models", help="print each model and the service that serves it")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            build_all(args.repository)
        except subprocess.CalledProcessError as exc:
            print(f"model build failed: {exc}", file=sys.stderr)
            return 1
        return 0
    for model, svc in models().items():
        print(f"{model}\t{svc.name}\t{svc.module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
