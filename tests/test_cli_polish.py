"""The `twofold` command's messages, as a newcomer meets them (issue 21, item 8 and missing files).

Each case runs the real command in a subprocess and checks what it prints and its exit code:
no "ok" before a failing exit, one line naming the missing folder or the YAML error's
position, defaults in `--help`, and the repository ignoring what the documented commands write.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from twofold.demo.processes import ROOT


def twofold(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "twofold", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_strict_validate_with_warnings_does_not_say_ok(tmp_path: Path) -> None:
    flags = tmp_path / "flags"
    flags.mkdir()
    for f in (ROOT / "examples" / "flags").iterdir():
        (flags / f.name).write_text(f.read_text())
    # A client whose secret comes from an unset environment variable: a warning, an error only with --strict.
    (flags / "clients.yaml").write_text("client: backend\nsecrets:\n  - secret_env: TWOFOLD_TEST_UNSET_SECRET\n")
    relaxed = twofold("flags", "validate", str(flags))
    assert relaxed.returncode == 0 and relaxed.stdout.startswith("ok:") and "warning" in relaxed.stderr
    strict = twofold("flags", "validate", "--strict", str(flags))
    assert strict.returncode == 1
    assert "ok" not in strict.stdout and "--strict" in strict.stderr


@pytest.mark.parametrize("make", ["missing", "file"])
def test_validate_names_a_missing_folder_plainly(tmp_path: Path, make: str) -> None:
    target = tmp_path / "no-such"
    if make == "file":
        target.write_text("flag: x\n")
    done = twofold("flags", "validate", str(target))
    assert done.returncode == 1
    assert ":0:" not in done.stderr and str(target) in done.stderr
    assert ("does not exist" if make == "missing" else "not a folder") in done.stderr


def test_analyze_bad_yaml_is_one_line_with_its_position(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nflag: [unclosed\nvariants: 1\n")
    done = twofold("analyze", str(bad), "--lake", str(tmp_path / "lake"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert f"{bad}:3:9: not valid YAML" in done.stderr


def test_missing_inputs_say_what_and_how_to_make_them(tmp_path: Path) -> None:
    train = twofold("train", "xgboost", "--data", "users.parquet", "--label", "converted", "--model", "m",
                    "--repository", "models", cwd=tmp_path)
    assert train.returncode == 2 and "users.parquet: no such file" in train.stderr
    assert "twofold example data" in train.stderr
    serve = twofold("serve-analysis", "--experiments", "nope", "--port", "0", "--metrics-port", "-1", cwd=tmp_path)
    assert serve.returncode == 2 and "--experiments nope: no such file or folder" in serve.stderr


@pytest.mark.parametrize(("command", "shown"), [
    (("serve-assignment",), "(default: data/lake)"),
    (("train", "xgboost"), "(default: auto)"),
    (("analyze",), "(default: table)"),
    (("flags", "compile"), "(default: -)"),
])
def test_help_shows_defaults(command: tuple[str, ...], shown: str) -> None:
    done = twofold(*command, "--help")
    assert done.returncode == 0
    assert shown in " ".join(done.stdout.split()), done.stdout


def test_what_the_documented_commands_write_is_ignored(tmp_path: Path) -> None:
    paths = ["models/home-ranker/1/model.onnx", "results/home-ranking.html", "data/lake/x.parquet",
             "data/demo/logs/a.log", "data/example/users.parquet"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == sorted(paths), done.stdout
