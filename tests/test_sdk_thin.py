"""The client SDK stays thin: a backend service that installs it must not carry the servers' code.

Checked two ways, because either alone can be fooled: statically (no module of `client_sdk`
names a server package in any import, lazy ones inside functions included) and at run time (a
fresh interpreter that imports every `client_sdk` module has loaded no server package).
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import client_sdk

SERVER_PACKAGES = ("assignment_server", "model_server", "analysis_worker")
SDK_ROOT = Path(client_sdk.__file__).parent


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_sdk_module_imports_a_server_package() -> None:
    offenders = {
        str(path.relative_to(SDK_ROOT.parent)): sorted(n for n in _imported_names(path)
                                                       if n.split(".")[0] in SERVER_PACKAGES)
        for path in SDK_ROOT.rglob("*.py")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"client_sdk imports server code: {offenders}"


def test_importing_every_sdk_module_loads_no_server_package() -> None:
    modules = [m.name for m in pkgutil.walk_packages([str(SDK_ROOT)], prefix="client_sdk.")]
    assert "client_sdk.provider" in modules and "client_sdk.local" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as e:\n"  # an optional extra (openfeature) may be missing
        "        if 'openfeature' not in str(e): raise\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_PACKAGES!r})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=SDK_ROOT.parent)
    assert out.stdout.strip() == "", f"server packages loaded by client_sdk: {out.stdout.strip()}"
