"""CacheWriter: modes, resume after interruption (kill -9 included), errors from the background thread."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache_format import (
    CacheExistsError,
    CacheWriter,
    IncompatibleCacheError,
    IncompleteCacheError,
    TopKEncoding,
    open_cache,
    verify_cache,
)
from cache_format.errors import DuplicateError, EncodingError, WriterStateError
from cache_format.manifest import INCOMPLETE_MARKER, MANIFEST_NAME, PROGRESS_JOURNAL, UNIT_MARKER_RE
from helpers.cache import identity, topk_batch, write_topk_cache
from helpers.writer_child import WriterChild


def rows_of(root: Path) -> list[tuple[str, bytes, bytes]]:
    return [(r.sample_id, r.ids.tobytes(), r.logprobs.tobytes()) for r in open_cache(root).iter_rows()]


def test_create_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CacheExistsError, match=r"not empty.*overwrite"):
        CacheWriter(tmp_path / "c", identity())


def test_overwrite_replaces_a_cache_but_never_foreign_files(tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=2)
    write_topk_cache(root, units=1, seed=5, mode="overwrite")
    assert len(open_cache(root).shard_infos) == 1
    (root / "notes.txt").write_text("mine")
    with pytest.raises(CacheExistsError, match=r"notes.txt"):
        CacheWriter(root, identity(), mode="overwrite")
    assert (root / "notes.txt").exists() and (root / MANIFEST_NAME).exists()


def test_unfinished_cache_is_refused_by_readers_and_resumable(tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=2, finalize=False)
    assert (root / INCOMPLETE_MARKER).exists() and not (root / MANIFEST_NAME).exists()
    with pytest.raises(IncompleteCacheError, match=r"unfinished.*resume"):
        open_cache(root)
    with CacheWriter(root, identity(), mode="resume") as w:
        assert w.completed_units == {0, 1}
        w.write(topk_batch(["u2-r0"], seed=2))
        w.end_unit(2)
        w.finalize()
    assert [s.unit for s in open_cache(root).shard_infos] == [0, 1, 2]


def test_resume_refuses_a_different_identity_naming_the_field(tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=1, finalize=False)
    other = identity(TopKEncoding(k=16))
    with pytest.raises(IncompatibleCacheError, match=r"encoding\.k: 8 != 16"):
        CacheWriter(root, other, mode="resume")
    # run info is not part of the identity: a different worker/host may resume.
    CacheWriter(root, identity(run={"host": "elsewhere"}), mode="resume").close()


def test_resume_of_a_finished_cache_keeps_it_identical(tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=2)
    before = rows_of(root)
    with CacheWriter(root, identity(), mode="resume") as w:
        assert w.completed_units == {0, 1}
        with pytest.raises(WriterStateError, match=r"completed by an earlier run"):
            w.end_unit(1)
        w.finalize()
    assert rows_of(root) == before


def test_resume_discards_partial_work(tmp_path: Path) -> None:
    """Crash leftovers: a temp shard, a renamed shard whose unit was never journaled, a torn journal line."""
    root = write_topk_cache(tmp_path / "c", units=2, finalize=False)
    (root / ".tmp-deadbeef.arrow").write_bytes(b"half a shard")
    orphan = root / "shard-u000000007-p0000.arrow"
    orphan.write_bytes((root / "shard-u000000001-p0000.arrow").read_bytes())
    with open(root / PROGRESS_JOURNAL, "a") as fh:
        fh.write('{"unit": 7, "shards": [{"name": "shard-u0000')
    with CacheWriter(root, identity(), mode="resume") as w:
        assert w.completed_units == {0, 1}
        w.finalize()
    assert not orphan.exists() and not (root / ".tmp-deadbeef.arrow").exists()
    assert verify_cache(root)["rows"] == 8


def test_background_error_is_raised_in_the_caller(tmp_path: Path) -> None:
    batch = topk_batch(["a", "b"])
    batch.logprobs[3, 2] = np.nan
    w = CacheWriter(tmp_path / "c", identity())
    w.write(batch)
    with pytest.raises(EncodingError, match=r"sample_id 'a' position 3.*NaN"):
        w.end_unit(0)
        w.finalize()
    w.close()
    # Nothing half-written looks complete.
    with pytest.raises(IncompleteCacheError):
        open_cache(tmp_path / "c")


def test_background_error_is_raised_on_exit(tmp_path: Path) -> None:
    batch = topk_batch(["a"])
    batch.ids[0, 0] = 10**6
    with pytest.raises(EncodingError, match=r"token id 1000000"), CacheWriter(tmp_path / "c", identity()) as w:
        w.write(batch)
        w.end_unit(0)


def test_usage_errors(tmp_path: Path) -> None:
    with CacheWriter(tmp_path / "c", identity()) as w:
        w.write(topk_batch(["a"]))
        with pytest.raises(DuplicateError, match=r"'a'"):
            w.write(topk_batch(["a"], seed=1))
        w.end_unit(0)
        with pytest.raises(WriterStateError, match=r"already ended"):
            w.end_unit(0)
        with pytest.raises(EncodingError, match=r"shape \(11, 8\).*k=4|k=8"):
            w.write(topk_batch(["b"], k=4))
        w.finalize()
        with pytest.raises(WriterStateError, match=r"finalized"):
            w.write(topk_batch(["c"]))


def test_rows_without_end_unit_become_a_last_unit(tmp_path: Path) -> None:
    with CacheWriter(tmp_path / "c", identity(), max_shard_rows=2) as w:
        w.write(topk_batch(["a", "b", "c"]))
        w.end_unit(4)
        w.write(topk_batch(["d"], seed=1))
        w.write(topk_batch(["e"], seed=2))
        w.write(topk_batch(["f"], seed=3))
        m = w.finalize()
    assert m["units"] == [4, 5]
    assert [(s["unit"], s["part"], s["rows"]) for s in m["shards"]] == [(4, 0, 3), (5, 0, 2), (5, 1, 1)]
    assert [r.sample_id for r in open_cache(tmp_path / "c").iter_rows()] == list("abcdef")
    assert w.stats["rows"] == 6 and w.stats["encode_s"] > 0


@pytest.mark.slow
def test_kill_minus_9_at_any_moment_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    child = WriterChild(tmp_path)
    child.run_to_end(str(tmp_path / "ref"))
    root = tmp_path / "killed"
    progress = []
    # Kill after different units were queued, at different offsets into the next one: mid-write,
    # mid-encode, between rename and unit marker, ...
    for after_unit, extra in ((0, 0.0), (3, 0.013), (6, 0.027), (9, 0.005)):
        child.kill_after(str(root), after_unit, extra)
        progress.append(sum(1 for p in root.iterdir() if UNIT_MARKER_RE.fullmatch(p.name)))
    assert not (root / MANIFEST_NAME).exists() and 0 < max(progress) < 12, progress
    child.run_to_end(str(root))
    assert rows_of(root) == rows_of(tmp_path / "ref")
    verify_cache(root)
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert json.loads((root / MANIFEST_NAME).read_text())["units"] == list(range(12))
