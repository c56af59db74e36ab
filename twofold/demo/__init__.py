"""`twofold demo`: the end-to-end main job (see twofold.demo.run).

Only the Command lives here; the heavy imports (XGBoost, ONNX Runtime, DuckDB) happen when the
demo runs, so `twofold --help` stays fast.
"""

from __future__ import annotations

import argparse

from twofold.cli import Command


def _configure(parser: argparse.ArgumentParser) -> None:
    from twofold.demo.run import configure

    configure(parser)


def _run(args: argparse.Namespace) -> int:
    from twofold.demo.run import run

    return run(args)


DEMO = Command(configure=_configure, run=_run)
