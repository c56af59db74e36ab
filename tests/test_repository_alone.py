"""The test suite runs from the repository alone: no `../shared` beside the checkout.

A copy of the repository's files (what `git` tracks or would track) goes to a folder with
nothing beside it; pytest there must collect every conformance case and pass a few of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.spec_data import IN_REPOSITORY, ROOT


def test_conformance_cases_ship_with_their_notice_and_licence() -> None:
    names = {p.name for p in IN_REPOSITORY.iterdir()}
    assert {"state.json", "tests.json", "NOTICE.md", "LICENSE"} <= names
    assert "Apache License" in (IN_REPOSITORY / "LICENSE").read_text()
    assert len(json.loads((IN_REPOSITORY / "tests.json").read_text())) > 100


def test_suite_collects_and_runs_conformance_from_a_lone_clone(tmp_path: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    clone = tmp_path / "lone" / "twofold"
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, clone / name)
    env = {k: v for k, v in os.environ.items() if k != "TWOFOLD_CONFORMANCE_DIR"}
    env["PYTHONPATH"] = str(clone)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_assignment_conformance.py", "-k", "test_confidence_spec_case"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and int(done.stdout.split(" passed")[0].split()[-1]) > 100
