"""A cache uploaded to an S3-compatible server (moto, on 127.0.0.1) and read back through open_cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cache_format import (
    CacheExistsError,
    CacheNotFoundError,
    copy_cache,
    open_cache,
    read_identity,
    verify_cache,
)
from helpers.cache import write_topk_cache
from helpers.moto_s3 import free_port as _free_port  # noqa: F401 (test_s3_timeouts imports it from here)
from helpers.moto_s3 import moto_available, moto_server
from helpers.moto_s3 import wait_for_port as _wait_for_port  # noqa: F401

# moto runs in its own process, never imported here: see helpers/moto_s3.py.
if not moto_available():
    pytest.skip("moto[server] and s3fs are needed (the dev extra)", allow_module_level=True)


@pytest.fixture(scope="module")
def s3(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    fake_credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}
    for key, value in fake_credentials.items():
        monkeypatch_module.setenv(key, value)
    with moto_server(**fake_credentials) as (_, endpoint):
        yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_upload_then_read_through_the_same_api(s3: dict[str, object], tmp_path: Path) -> None:
    local = write_topk_cache(tmp_path / "c", units=2, rows_per_unit=3)
    url = "s3://caches/team-a/wikitext-k8"
    copy_cache(local, url, dst_storage_options=s3)
    remote = open_cache(url, storage_options=s3)
    want = list(open_cache(local).iter_rows())
    got = list(remote.iter_rows())
    assert [r.sample_id for r in got] == [r.sample_id for r in want]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert remote.read_row(1, 2).sample_id == want[5].sample_id
    assert verify_cache(url, s3)["rows"] == 6
    assert read_identity(url, s3) == open_cache(local).identity
    with pytest.raises(CacheExistsError):
        copy_cache(local, url, dst_storage_options=s3)
    # And back down again.
    down = copy_cache(url, str(tmp_path / "down"), src_storage_options=s3)
    assert down["totals"]["rows"] == 6


def test_missing_remote_cache_is_a_clear_error(s3: dict[str, object]) -> None:
    with pytest.raises(CacheNotFoundError, match=r"s3://caches/nothing-here/manifest\.json"):
        open_cache("s3://caches/nothing-here", storage_options=s3)
    assert read_identity("s3://caches/nothing-here", s3) is None
