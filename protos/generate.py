"""Generate Python stubs and the Envoy descriptor set from every .proto under protos/.

Run by `make protos` (and so by every setup target): stubs are generated at setup,
never committed. Output: protos/gen/python/ (an importable tree: `fraud.v1`,
`inference`), protos/gen/descriptors.pb (a FileDescriptorSet with imports, for
Envoy's gRPC-JSON transcoder) and protos/gen/openapi.json (the REST API's OpenAPI
document, protos/openapi.py; published as docs/api/openapi.json).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import google.api  # googleapis-common-protos ships google/api/*.proto
import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
GEN = PROTO_ROOT / "gen"
PY_OUT = GEN / "python"


def proto_files() -> list[Path]:
    """Every .proto of ours, relative to protos/."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto") if GEN not in p.parents)


def main() -> int:
    files = proto_files()
    if PY_OUT.exists():
        shutil.rmtree(PY_OUT)
    PY_OUT.mkdir(parents=True)
    includes = [
        str(PROTO_ROOT),
        str(Path(google.api.__path__[0]).parent.parent),  # .../site-packages
        str(Path(grpc_tools.__file__).parent / "_proto"),  # google/protobuf/*.proto
    ]
    args = ["grpc_tools.protoc", *(f"-I{i}" for i in includes)]
    args += [
        f"--python_out={PY_OUT}",
        f"--pyi_out={PY_OUT}",
        f"--grpc_python_out={PY_OUT}",
        f"--descriptor_set_out={GEN / 'descriptors.pb'}",
        "--include_imports",
        "--include_source_info",
        *map(str, files),
    ]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return rc
    for package_dir in {PY_OUT / f.parent for f in files}:
        for d in [package_dir, *package_dir.parents]:
            if d == PY_OUT or PY_OUT not in d.parents:
                break
            (d / "__init__.py").touch()
    # The REST API's OpenAPI document (from the same descriptors: what the gateway transcodes).
    sys.path.insert(0, str(PROTO_ROOT))
    import openapi

    (GEN / "openapi.json").write_text(openapi.dumps(openapi.build((GEN / "descriptors.pb").read_bytes())))
    print(f"generated stubs for {len(files)} protos into {PY_OUT.relative_to(PROTO_ROOT.parent)}, and openapi.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
