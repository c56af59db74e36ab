"""Where the Confidence resolver conformance data lives: `tests/conformance/` in the repository.

The cases are Spotify's test data (Apache-2.0, see the folder's NOTICE.md and LICENSE), kept
beside the tests so the suite runs from a fresh clone alone. `TWOFOLD_CONFORMANCE_DIR` points
elsewhere (e.g. a fuller copy of the suite). Missing data fails loudly: a conformance suite
that silently collects no case would pass for the wrong reason.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IN_REPOSITORY = ROOT / "tests" / "conformance" / "confidence-resolver-spec"


def conformance_dir() -> Path:
    """The folder holding `state.json` and `tests.json`; raises when none is found."""
    candidates = [os.environ.get("TWOFOLD_CONFORMANCE_DIR"), str(IN_REPOSITORY)]
    for candidate in candidates:
        if candidate and (Path(candidate) / "tests.json").exists():
            return Path(candidate)
    raise FileNotFoundError(
        "Confidence conformance data not found; looked in: " + ", ".join(c for c in candidates if c)
        + ". Set TWOFOLD_CONFORMANCE_DIR.")


CONFORMANCE_DIR = conformance_dir()
