"""Remote stores that stall, die, refuse or forbid: bounded time, one RemoteStorageError naming the URL.

Each moto server runs in its own process on 127.0.0.1 (see test_s3.py for why), so a test can
stop (SIGSTOP: connections hang) or kill (SIGKILL: connections refused) it in the middle of a read.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cache_format import copy_cache, open_cache, verify_cache
from cache_format.errors import RemoteStorageError, UnsafeFileError
from cache_format.storage import S3_CONFIG_DEFAULTS, Storage
from helpers.cache import write_topk_cache
from helpers.moto_s3 import CREDENTIALS, free_port, moto_available
from helpers.moto_s3 import moto_server as _moto_server
from pipeline.cli import main

if not moto_available():
    pytest.skip("moto[server] and s3fs are needed (the dev extra)", allow_module_level=True)
BOUND_S = 60


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)


def moto_server(**env: str) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[bytes], str]]:
    """A moto server without a bucket (tests create theirs, or test a missing one)."""
    return _moto_server(bucket=None, **env)


def fast(endpoint: str) -> dict[str, Any]:
    """Short timeouts and 2 tries, so a stalled server fails the test run quickly (defaults: see below)."""
    return {"endpoint_url": endpoint, "config_kwargs": {
        "connect_timeout": 1, "read_timeout": 2, "retries": {"total_max_attempts": 2, "mode": "standard"}}}


def uploaded(endpoint: str, tmp_path: Path, url: str, units: int = 3) -> Path:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="caches")
    local = write_topk_cache(tmp_path / "c", units=units)
    copy_cache(local, url, dst_storage_options=fast(endpoint))
    return local


def test_server_that_stops_answering_mid_verify_ends_in_bounded_time(tmp_path: Path) -> None:
    with moto_server() as (proc, endpoint):
        url = "s3://caches/stall"
        uploaded(endpoint, tmp_path, url)
        lines: list[str] = []

        def stop_after_the_first_shard(line: str) -> None:
            lines.append(line)
            if len(lines) == 1:
                os.kill(proc.pid, signal.SIGSTOP)  # the process freezes; the kernel still accepts connections

        start = time.monotonic()
        with pytest.raises(RemoteStorageError, match=r"s3://caches/stall/shard-u000000001-p0000\.arrow .*timed out "
                                                     r"after 2 tries") as info:
            verify_cache(url, fast(endpoint), progress=stop_after_the_first_shard)
        assert time.monotonic() - start < BOUND_S
        assert len(lines) == 1 and "\n" not in str(info.value)


def test_server_killed_mid_read_ends_in_bounded_time(tmp_path: Path) -> None:
    with moto_server() as (proc, endpoint):
        url = "s3://caches/killed"
        uploaded(endpoint, tmp_path, url)
        rows = open_cache(url, fast(endpoint)).iter_rows()
        next(rows)  # shard 0 is being read
        proc.kill()
        proc.wait()
        start = time.monotonic()
        with pytest.raises(RemoteStorageError, match=r"s3://caches/killed/shard-u000000001-p0000\.arrow .*"
                                                     r"could not reach the server after 2 tries"):
            list(rows)
        assert time.monotonic() - start < BOUND_S


def test_refused_connection_is_an_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    local = write_topk_cache(tmp_path / "c", units=1)
    for run in (lambda: open_cache("s3://caches/x", fast(endpoint)),
                lambda: copy_cache(local, "s3://caches/x", dst_storage_options=fast(endpoint)),
                lambda: copy_cache("s3://caches/x", str(tmp_path / "down"), src_storage_options=fast(endpoint))):
        start = time.monotonic()
        with pytest.raises(RemoteStorageError, match=r"s3://caches/x.* could not reach the server after 2 tries"):
            run()
        assert time.monotonic() - start < BOUND_S
    with pytest.raises(SystemExit) as exc:  # the CLI, with the default timeouts and tries
        main(["cache", "verify", "s3://caches/x", "--endpoint-url", endpoint])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "could not reach the server after 4 tries" in err and err.count("\n") == 0


def test_forbidden_and_missing_bucket_are_named() -> None:
    # INITIAL_NO_AUTH_ACTION_COUNT=0: moto checks credentials, and ours are fake.
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as (_, endpoint), pytest.raises(
            RemoteStorageError, match=r"s3://caches/x/manifest\.json was refused: access denied"):
        open_cache("s3://caches/x", fast(endpoint))
    with moto_server() as (_, endpoint), pytest.raises(RemoteStorageError, match=r"bucket 'nobucket' does not exist"):
        open_cache("s3://nobucket/x", fast(endpoint))


def test_shard_linked_to_credentials_is_never_uploaded(tmp_path: Path) -> None:
    secret = b"aws_secret_access_key = hunter2hunter2\n"
    (tmp_path / "credentials").write_bytes(secret)
    with moto_server() as (_, endpoint):
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="team")
        local = write_topk_cache(tmp_path / "c", units=3)
        shard1 = local / "shard-u000000001-p0000.arrow"
        shard1.unlink()
        shard1.symlink_to(tmp_path / "credentials")
        with pytest.raises(UnsafeFileError, match=r"shard-u000000001-p0000\.arrow is a symbolic link"):
            copy_cache(local, "s3://team/shared", dst_storage_options=fast(endpoint))
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="team").get("Contents", [])]
        assert keys == ["shared/shard-u000000000-p0000.arrow"]  # shard 0 went before the link was met; no manifest
        assert all(b"hunter2" not in s3.get_object(Bucket="team", Key=k)["Body"].read() for k in keys)
        # Rerunning into the same prefix once the cache is fixed: the unfinished copy's shard is kdpipe's own.
        shard1.unlink()
        write_topk_cache(tmp_path / "fixed", units=3)
        copy_cache(tmp_path / "fixed", "s3://team/shared", dst_storage_options=fast(endpoint))
        assert verify_cache("s3://team/shared", fast(endpoint))["rows"] == 12


def test_default_timeouts_and_tries_apply_and_can_be_overridden() -> None:
    fs = Storage("s3://caches/x", {"endpoint_url": "http://127.0.0.1:9"})._fs
    assert fs.config_kwargs == S3_CONFIG_DEFAULTS and fs.retries == 1  # botocore's bounded tries only
    assert S3_CONFIG_DEFAULTS["retries"]["total_max_attempts"] == 4
    fs = Storage("s3://caches/x", {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"read_timeout": 5}})._fs
    assert fs.config_kwargs["read_timeout"] == 5 and fs.config_kwargs["connect_timeout"] == 10
