"""CacheWriter straight into an object store (moto S3 in its own process, and memory://): shards under
their final names, one marker object per unit, the manifest last; kill -9 and a stopped server."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from cache_format import CacheWriter, IncompleteCacheError, copy_cache, open_cache, verify_cache
from cache_format.errors import MissingUnitsError, RemoteStorageError
from cache_format.finalize import finalize_cache
from cache_format.manifest import INCOMPLETE_MARKER, MANIFEST_NAME, UNIT_MARKER_RE
from helpers.cache import identity, topk_batch
from helpers.moto_s3 import CREDENTIALS, fast_options, list_keys, moto_available, moto_server
from helpers.writer_child import WriterChild

BOUND_S = 60

if not moto_available():
    pytest.skip("moto[server] and s3fs are needed (the dev extra)", allow_module_level=True)


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)


def rows_of(url: str, opts: dict[str, Any] | None = None) -> list[tuple[str, bytes]]:
    return [(r.sample_id, r.ids.tobytes() + r.logprobs.tobytes()) for r in open_cache(url, opts).iter_rows()]


def write_units(w: CacheWriter, units: range) -> None:
    for u in units:
        w.write(topk_batch([f"u{u}-r{i}" for i in range(3)], seed=u))
        w.end_unit(u)


def test_writer_into_s3_writes_shards_then_markers_then_the_manifest(tmp_path: Path) -> None:
    with moto_server() as (_, endpoint):
        opts = fast_options(endpoint)
        url = "s3://caches/team/run1"
        with CacheWriter(url, identity(), storage_options=opts) as w:
            write_units(w, range(3))
            w.commit()
        keys = list_keys(endpoint, "caches", "team/run1")
        assert INCOMPLETE_MARKER in keys and MANIFEST_NAME not in keys
        assert sorted(k for k in keys if UNIT_MARKER_RE.fullmatch(k)) == [f".kdpipe-unit-{u:09d}.json" for u in range(3)]
        assert not [k for k in keys if k.startswith(".tmp-")]  # no temporary objects: each PUT is the commit
        with pytest.raises(IncompleteCacheError):
            open_cache(url, opts)
        m = finalize_cache(url, opts)
        assert finalize_cache(url, opts) == m  # idempotent
        assert list_keys(endpoint, "caches", "team/run1") == [MANIFEST_NAME] + [
            f"shard-u{u:09d}-p0000.arrow" for u in range(3)]
        with CacheWriter(tmp_path / "local", identity()) as w:
            write_units(w, range(3))
            w.finalize()
        assert rows_of(url, opts) == rows_of(str(tmp_path / "local"))
        assert verify_cache(url, opts)["rows"] == 9
        # Resume into the finished remote cache: one more unit, the old ones kept.
        with CacheWriter(url, identity(), mode="resume", storage_options=opts) as w:
            assert w.completed_units == {0, 1, 2}
            write_units(w, range(3, 4))
            assert w.finalize()["units"] == [0, 1, 2, 3]


def test_writer_into_a_memory_url_and_finalize_by_count(tmp_path: Path) -> None:
    ident = identity()
    ident = type(ident)(**{**ident.__dict__, "recipe": {**ident.recipe, "units": {"unit_rows": 3, "count": 4}}})
    url = f"memory://kdpipe-test/{tmp_path.name}"
    with CacheWriter(url, ident, mode="shared") as w:
        write_units(w, range(0, 4, 2))
        w.commit()
    with pytest.raises(MissingUnitsError, match=r"2 of 4 units are not complete yet: unit 1, 3.*kdpipe cache "
                                                r"finalize") as info:
        finalize_cache(url)
    assert info.value.missing == [1, 3] and info.value.totals["rows"] == 6
    with CacheWriter(url, ident, mode="shared") as w:
        assert w.completed_units == {0, 2}
        write_units(w, range(1, 4, 2))
        w.commit()
    assert finalize_cache(url)["units"] == [0, 1, 2, 3]
    assert len(rows_of(url)) == 12


@pytest.mark.slow
def test_kill_minus_9_mid_upload_then_resume_into_the_same_prefix(tmp_path: Path) -> None:
    child = WriterChild(tmp_path, **CREDENTIALS)
    child.run_to_end(str(tmp_path / "ref"))
    with moto_server() as (_, endpoint):
        opts = fast_options(endpoint)
        url = "s3://caches/killed"
        progress = []
        for after_unit, extra in ((1, 0.0), (4, 0.013), (7, 0.027)):
            child.kill_after(url, after_unit, extra, opts)
            progress.append(sum(1 for k in list_keys(endpoint, "caches", "killed") if UNIT_MARKER_RE.fullmatch(k)))
        assert MANIFEST_NAME not in list_keys(endpoint, "caches", "killed") and 0 < max(progress) < 12, progress
        child.run_to_end(url, opts)
        assert rows_of(url, opts) == rows_of(str(tmp_path / "ref"))  # every unit exactly once, in order
        assert open_cache(url, opts).manifest.units == list(range(12))
        assert list_keys(endpoint, "caches", "killed") == sorted(p.name for p in (tmp_path / "ref").iterdir())
        verify_cache(url, opts)


def test_server_stopped_mid_upload_fails_in_bounded_time_and_a_rerun_completes(tmp_path: Path) -> None:
    with moto_server() as (proc, endpoint):
        opts = fast_options(endpoint)
        url = "s3://caches/frozen"
        w = CacheWriter(url, identity(), storage_options=opts)
        write_units(w, range(2))
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGSTOP)  # frozen: the kernel still accepts connections, nothing answers
        start = time.monotonic()
        try:
            with pytest.raises(RemoteStorageError) as info:
                # botocore sends a file-like PUT body with "Expect: 100-continue": a frozen server never answers it.
                w.write(big_batch())
                w.end_unit(2)
                w.commit()
            took = time.monotonic() - start
        finally:
            w.close()
            os.kill(proc.pid, signal.SIGCONT)
        message = str(info.value)
        print(f"stopped server: RemoteStorageError after {took:.1f} s: {message}")
        assert took < BOUND_S, took
        assert "\n" not in message and "s3://caches/frozen/" in message and "tries" in message, message
        assert MANIFEST_NAME not in list_keys(endpoint, "caches", "frozen")
        with CacheWriter(url, identity(), mode="resume", storage_options=opts) as w:
            assert w.completed_units == {0, 1}
            w.write(big_batch())
            w.end_unit(2)
            assert w.finalize()["units"] == [0, 1, 2]
        assert open_cache(url, opts).manifest.shards[2].bytes > 100_000
        verify_cache(url, opts)


def big_batch() -> Any:
    return topk_batch([f"big-{i}" for i in range(100)], length=200, seed=7)


def test_copy_and_merge_into_s3(tmp_path: Path) -> None:
    from cache_format import merge_caches

    with moto_server() as (_, endpoint):
        opts = fast_options(endpoint)
        parts = []
        for i in range(2):
            with CacheWriter(tmp_path / f"p{i}", identity()) as w:
                write_units(w, range(i, 4, 2))
                w.finalize()
            parts.append(str(tmp_path / f"p{i}"))
        m = merge_caches("s3://caches/merged", parts, out_storage_options=opts)
        assert m["units"] == [0, 1, 2, 3] and verify_cache("s3://caches/merged", opts)["rows"] == 12
        down = tmp_path / "down"
        copy_cache("s3://caches/merged", str(down), src_storage_options=opts)
        assert [r.sample_id for r in open_cache(down).iter_rows()][:3] == ["u0-r0", "u0-r1", "u0-r2"]
