"""Regenerate the Python modules for every `.proto` file under `protos/`.

Run as `python -m protos.generate` from the repository root. The generated modules are
committed; CI runs this script and fails when `git diff` shows a change, so the checked-in
code always matches the sources.

The generator is pinned (`grpcio-tools==1.72.1`, protobuf 6.30 gencode) on purpose: gencode
must be no newer than the oldest protobuf runtime the project allows (`protobuf>=6.30,<7`,
the range `tritonclient[grpc]` also accepts), because a protobuf runtime refuses gencode
newer than itself.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def proto_files() -> list[Path]:
    """All proto sources, sorted so generation order (and output) is stable."""
    return sorted(PROTO_DIR.rglob("*.proto"))


def ensure_packages() -> None:
    """Give every folder holding generated code an `__init__.py`, so setuptools ships it."""
    for proto in proto_files():
        folder = proto.parent
        while folder != ROOT:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated protobuf package."""\n')
            folder = folder.parent


def main() -> int:
    """Run protoc once over all sources; return its exit code."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    files = [str(p.relative_to(ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *files,
    ]
    code = protoc.main(args)
    if code == 0:
        ensure_packages()
    return code


if __name__ == "__main__":
    sys.exit(main())
