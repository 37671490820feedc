"""Regenerate the Python code for protos/ into service/ (or --out DIR).

The proto path equals the Python package path (protos/nexus/v1 -> nexus.v1), so
the generated absolute imports work from a checkout and from an installed wheel.
The output is committed; CI regenerates it and fails on any difference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "service"


def tool(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise SystemExit(f"{name} not found: pip install -e '.[dev]'")
    return found


def generate(out: Path) -> int:
    from grpc_tools import protoc  # imported here: a dev-only dependency

    package = out / "nexus" / "v1"
    package.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "nexus" / "v1").glob("*.proto"))
    for stale in package.glob("*_pb2*"):
        stale.unlink()
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        f"--plugin=protoc-gen-mypy={tool('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={tool('protoc-gen-mypy_grpc')}",
        *protos,
    ]
    status = protoc.main(args)
    if status != 0:
        return status
    (package / "__init__.py").write_text('"""Generated protobuf and gRPC code for nexus.v1 (see scripts/gen_protos.py)."""\n')
    (package / "py.typed").touch()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT, help="Output root (default: service/).")
    sys.exit(generate(parser.parse_args().out))
