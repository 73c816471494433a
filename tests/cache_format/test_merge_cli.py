"""merge_caches (workers of one dump → one cache) and the `kdpipe cache` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cache_format import (
    CacheExistsError,
    CacheWriter,
    IncompatibleCacheError,
    TopKEncoding,
    merge_caches,
    open_cache,
    verify_cache,
)
from cache_format.errors import DuplicateError
from helpers.cache import identity, topk_batch, write_topk_cache
from pipeline.cli_cache import cache_app

UNITS = 6


def worker_cache(root: Path, worker: int, num_workers: int, **run: object) -> Path:
    """Worker i of N writes units j with j % N == i, like the dump does."""
    with CacheWriter(root, identity(run={"worker": worker, **run})) as w:
        for u in range(UNITS):
            if u % num_workers == worker:
                w.write(topk_batch([f"u{u}-r{i}" for i in range(2)], seed=u))
                w.end_unit(u)
        w.finalize()
    return root


def single_cache(root: Path) -> Path:
    with CacheWriter(root, identity()) as w:
        for u in range(UNITS):
            w.write(topk_batch([f"u{u}-r{i}" for i in range(2)], seed=u))
            w.end_unit(u)
        w.finalize()
    return root


def rows(root: Path) -> list[tuple[str, bytes]]:
    return [(r.sample_id, r.logprobs.tobytes()) for r in open_cache(root).iter_rows()]


def test_merged_workers_equal_one_worker(tmp_path: Path) -> None:
    parts = [worker_cache(tmp_path / f"w{i}", i, 3) for i in range(3)]
    merged = merge_caches(tmp_path / "merged", parts)
    assert merged["units"] == list(range(UNITS))
    assert rows(tmp_path / "merged") == rows(single_cache(tmp_path / "single"))
    verify_cache(tmp_path / "merged")
    assert [m["run"]["worker"] for m in merged["identity"]["run"]["merged_from"]] == [0, 1, 2]


def test_merge_refuses_different_identity(tmp_path: Path) -> None:
    a = worker_cache(tmp_path / "a", 0, 2)
    with CacheWriter(tmp_path / "b", identity(TopKEncoding(k=8, value_step=0.25))) as w:
        w.write(topk_batch(["x"]))
        w.finalize()
    with pytest.raises(IncompatibleCacheError, match=r"encoding\.value_step: 0\.125 != 0\.25"):
        merge_caches(tmp_path / "m", [a, tmp_path / "b"])


def test_merge_refuses_duplicate_units_and_sample_ids(tmp_path: Path) -> None:
    a = worker_cache(tmp_path / "a", 0, 2)
    with pytest.raises(DuplicateError, match=r"unit 0 is in both"):
        merge_caches(tmp_path / "m", [a, worker_cache(tmp_path / "a2", 0, 2)])
    with CacheWriter(tmp_path / "c", identity()) as w:
        w.write(topk_batch(["u0-r0"]))
        w.end_unit(99)
        w.finalize()
    with pytest.raises(DuplicateError, match=r"sample_id 'u0-r0'"):
        merge_caches(tmp_path / "m2", [a, tmp_path / "c"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(CacheExistsError):
        merge_caches(tmp_path / "full", [a])


def test_cli_info_verify_merge(tmp_path: Path) -> None:
    runner = CliRunner()
    root = write_topk_cache(tmp_path / "c", units=2)
    res = runner.invoke(cache_app, ["info", str(root)])
    assert res.exit_code == 0, res.output
    assert "toy-teacher" in res.output and "k=8" in res.output
    assert "per target position" in res.output and "per input token" in res.output
    res = runner.invoke(cache_app, ["info", "--json", str(root)])
    info = json.loads(res.output)
    assert info["rows"] == 8 and info["positions"] == 88 and info["shards"] == 2
    assert info["encoding"] == {"kind": "topk", "k": 8, "value_step": 0.125, "temperature": 1.0}
    res = runner.invoke(cache_app, ["verify", str(root)])
    assert res.exit_code == 0 and "ok: 2 shards, 8 rows" in res.output
    parts = [worker_cache(tmp_path / f"w{i}", i, 2) for i in range(2)]
    res = runner.invoke(cache_app, ["merge", str(tmp_path / "m"), *map(str, parts)])
    assert res.exit_code == 0, res.output
    assert open_cache(tmp_path / "m").num_rows == 2 * UNITS
    res = runner.invoke(cache_app, ["copy", str(root), str(tmp_path / "copy")])
    assert res.exit_code == 0, res.output
    assert rows(tmp_path / "copy") == rows(root)
