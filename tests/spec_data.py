"""Where the Confidence resolver conformance data lives: `../shared/conformance/` beside the checkout.

DESIGN.md keeps it outside the repository (it is Spotify's data, used as test input only), and CI
lays `shared/` beside the clone. `TWOFOLD_CONFORMANCE_DIR` points elsewhere. Missing data fails
loudly: a conformance suite that silently collects no case would pass for the wrong reason.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def conformance_dir() -> Path:
    """The folder holding `state.json` and `tests.json`; raises when none is found."""
    candidates = [os.environ.get("TWOFOLD_CONFORMANCE_DIR"),
                  str(ROOT.parent / "shared" / "conformance" / "confidence-resolver-spec")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "tests.json").exists():
            return Path(candidate)
    raise FileNotFoundError(
        "Confidence conformance data not found; looked in: " + ", ".join(c for c in candidates if c)
        + ". Set TWOFOLD_CONFORMANCE_DIR.")


CONFORMANCE_DIR = conformance_dir()
