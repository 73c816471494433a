"""An S3-compatible moto server in its own process on 127.0.0.1, for tests of remote caches.

moto is never imported into the test process: its Flask app leaves werkzeug context-local proxies
in sys.modules, and vLLM's start-up (later in the same session) trips over them with "Working
outside of application context". The server runs in a child process instead, which also lets a
test stop it (SIGSTOP: connections hang) or kill it (SIGKILL: connections refused) mid-request.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}


def moto_available() -> bool:
    return importlib.util.find_spec("moto") is not None and importlib.util.find_spec("s3fs") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


@contextlib.contextmanager
def moto_server(bucket: str | None = "caches", **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """(server process, endpoint URL); ``bucket`` is created first. The process is killed on exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **CREDENTIALS, **env})
    try:
        wait_for_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        if bucket:
            create_bucket(endpoint, bucket)
        yield proc, endpoint
    finally:
        proc.kill()  # also ends a SIGSTOPped server
        proc.wait()


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)


def fast_options(endpoint: str, read_timeout: float = 2, tries: int = 2) -> dict[str, Any]:
    """Short timeouts and few tries, so a stalled server fails a test quickly."""
    return {"endpoint_url": endpoint, "config_kwargs": {
        "connect_timeout": 1, "read_timeout": read_timeout, "retries": {"total_max_attempts": tries,
                                                                        "mode": "standard"}}}


def list_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Object names under ``prefix`` (relative to it), straight from the server."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        out += [o["Key"][len(prefix.rstrip("/")) + 1:] for o in page.get("Contents", [])]
    return sorted(out)
