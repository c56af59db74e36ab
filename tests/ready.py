"""Waiting for a server process started by a test to publish its bound ports (`--ready-file`)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, timeout: float = 60.0) -> dict[str, Any]:
    """The ready file's content once the server wrote it; the server's stderr if it died or took too long.

    Why one helper: every real-process test polls the same way, and a start-up failure should
    say what the server printed rather than time out silently.
    """
    deadline = time.time() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.05)
    return json.loads(ready.read_text())
