"""README "Running the pieces", run as written: real processes in a fresh folder, real results.

The commands are taken from the README's code block itself (not copied here), run by bash in
a temporary folder holding only the repository's `examples/` and a `.venv` that is the
virtualenv running the tests. Only the three fixed gRPC ports are swapped for free ones (the
machine is shared), and metrics ports are chosen by the system (TWOFOLD_METRICS_PORT=0).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from twofold.demo.processes import ROOT


def readme_block(heading: str, language: str = "sh", containing: str = "") -> str:
    """The first ```language block after `heading` in README.md that contains `containing`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    for block in re.findall(rf"```{language}\n(.*?)```", section, re.S):
        if containing in block:
            return block
    raise AssertionError(f"no {language} block with {containing!r} under {heading}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_running_the_pieces_gives_results(tmp_path: Path) -> None:
    # The local SDK snippet of the quickstart runs against the same servers, before they stop.
    snippet = readme_block("### Backend developer", "python", "twofold-local-dev-secret")
    script = readme_block("## Running the pieces") + f"python - <<'SNIPPET'\n{snippet}SNIPPET\n"
    for port in ("50051", "50052", "50053"):
        assert port in script
        script = script.replace(port, str(free_port()))
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / ".venv").symlink_to(sys.prefix)
    env = {**os.environ, "TWOFOLD_METRICS_PORT": "0", "PYTHONPATH": str(ROOT)}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(["bash", "-c", f"set -e\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{script}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, (out[-3000:], done.stderr[-3000:])
    assert "fallbacks 0, resolve failures 0" in out, out
    served = out.strip().splitlines()[-1].split()
    assert served[-2] in ("MATCH", "NO_SEGMENT_MATCH") and served[-1] == "None", out[-500:]
    assert "no exposures" not in out
    table = out[out.index("experiment home-ranking"):]
    units = re.search(r"units: static=([\d,]+), ranker=([\d,]+), bandit=([\d,]+)", table)
    assert units, table
    assert min(int(n.replace(",", "")) for n in units.groups()) > 200, table
    for metric in ("purchase_rate", "revenue", "clicks_per_session"):
        for arm in ("ranker", "bandit"):
            assert re.search(rf"^{metric} .* {arm} ", table, re.M), table
    assert (tmp_path / "results" / "home-ranking.html").exists() or list((tmp_path / "results").glob("*.html"))
    assert (tmp_path / "models" / "home-ranker").is_dir() and (tmp_path / "models" / "home-linucb").is_dir()


def test_quickstart_targets_are_the_kubernetes_services() -> None:
    """The in-cluster snippet names Services that k8s/base defines, on their ports."""
    import yaml

    snippet = readme_block("### Backend developer", "python", "svc.cluster.local")
    services = {}
    for path in (ROOT / "k8s" / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Service":
                services[doc["metadata"]["name"]] = {p["port"] for p in doc["spec"]["ports"]}
    targets = re.findall(r"dns:///([a-z-]+)\.twofold\.svc\.cluster\.local:(\d+)", snippet)
    assert {name for name, _ in targets} == {"assignment-server", "model-server"}
    for name, port in targets:
        assert int(port) in services[name], (name, port, services)
    secret = readme_block("### Platform team", "sh")
    assert "client-secret-backend" in secret and "client-secret-backend" in snippet
