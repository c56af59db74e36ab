"""A real S3 API server on loopback for the lake's object-store tests: moto's standalone server,
started as its own process on a free port (it speaks S3 over HTTP; pyarrow's S3 client talks to
it exactly as to AWS)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict[str, str]

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.endpoint, region="us-east-1", access_key="test",
                                 secret_key="test", allow_bucket_creation=True)

    def new_bucket(self) -> str:
        bucket = f"lake-{uuid.uuid4().hex[:12]}"
        self.filesystem().create_dir(bucket)
        return bucket


@contextlib.contextmanager
def running_s3_server(log_dir: Path) -> Iterator[S3Server]:
    log = log_dir / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            match = re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
            if match:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{match.group(1)}"
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
        yield S3Server(endpoint, env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
