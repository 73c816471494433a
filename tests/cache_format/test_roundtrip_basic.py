"""Basic write → read round trips of the three encodings through the public API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cache_format import CacheWriter, open_cache, verify_cache
from helpers.cache import (
    class_batch,
    make_class_identity,
    make_sampled_identity,
    sampled_batch,
    topk_batch,
    write_topk_cache,
)


def test_topk_round_trip_is_close_and_normalised(tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=2, rows_per_unit=3)
    reader = open_cache(root)
    rows = list(reader.iter_rows())
    assert [r.sample_id for r in rows] == [f"u{u}-r{i}" for u in range(2) for i in range(3)]
    exact = topk_batch([f"u0-r{i}" for i in range(3)], seed=0)
    got = np.concatenate([r.logprobs for r in rows[:3]])
    # The default id coding (1.1 "set") lists entries of equal quantized value by rank: compare id sets.
    np.testing.assert_array_equal(np.sort(np.concatenate([r.ids for r in rows[:3]]), axis=1), np.sort(exact.ids, axis=1))
    # Quantization step 1/8 nat: each value within step/2 before renormalisation, within a step after.
    assert np.abs(got - exact.logprobs).max() <= 0.125
    total = np.exp(got.astype(np.float64)).sum(axis=1) + np.concatenate([r.tail for r in rows[:3]])
    np.testing.assert_allclose(total, 1.0, atol=2.5e-4)  # tail code: relative step 1/4096
    assert reader.read_row(1, 2).sample_id == "u1-r2"
    assert verify_cache(root)["rows"] == 6


def test_sampled_round_trip_counts_and_estimator(tmp_path: Path) -> None:
    batch = sampled_batch(["a", "b"], num_draws=16)
    with CacheWriter(tmp_path / "s", make_sampled_identity(16)) as w:
        w.write(batch)
        w.finalize()
    rows = list(open_cache(tmp_path / "s").iter_rows())
    draws = np.asarray(batch.draws)
    flat = 0
    for row in rows:
        for t in range(len(row.positions)):
            want = np.bincount(draws[flat], minlength=1000)
            got = np.zeros(1000, np.int64)
            np.add.at(got, row.ids[t], row.counts[t])
            np.testing.assert_array_equal(got, want)
            live = row.counts[t] > 0
            np.testing.assert_allclose(np.exp(row.logprobs[t][live]), row.counts[t][live] / 16, rtol=1e-6)
            flat += 1
    verify_cache(tmp_path / "s")


def test_class_logits_round_trip_is_exact(tmp_path: Path) -> None:
    batch = class_batch(["x", "y", "z"])
    with CacheWriter(tmp_path / "k", make_class_identity(3)) as w:
        w.write(batch)
        w.finalize()
    rows = list(open_cache(tmp_path / "k").iter_rows())
    np.testing.assert_array_equal(np.stack([r.class_logits for r in rows]), batch.logits.astype(np.float32))
    assert [r.label for r in rows] == [0, 1, 2]
    assert all(r.ids is None and len(r.positions) == 0 for r in rows)


def test_shard_subsets_for_workers_are_disjoint_and_complete(tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=5, rows_per_unit=2)
    reader = open_cache(root)
    parts = [reader.shards_for_worker(i, 3) for i in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(5))
    ids = [r.sample_id for p in parts for r in reader.iter_rows(shards=p)]
    assert sorted(ids) == sorted(r.sample_id for r in reader.iter_rows())
    assert reader.read_row(4, 1).target_mask.sum() == 11


def test_byte_budget_cuts_shards(tmp_path: Path) -> None:
    from helpers.cache import identity

    with CacheWriter(tmp_path / "c", identity(), max_shard_bytes=2000) as w:
        for i in range(4):
            w.write(topk_batch([f"r{i}"], seed=i))  # ~900 bytes of arrays per row
        w.end_unit(0)
        m = w.finalize()
    assert [s["part"] for s in m["shards"]] == [0, 1] and [s["rows"] for s in m["shards"]] == [3, 1]


def test_verify_checksums_on_open(tmp_path: Path) -> None:
    from cache_format import ChecksumMismatchError

    root = write_topk_cache(tmp_path / "c", units=1)
    shard = root / open_cache(root).shard_infos[0].name
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=r"sha256"):
        list(open_cache(root, verify_checksums=True).iter_rows())


def test_record_batches_bound_memory_and_random_access_crosses_them(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    from cache_format import shard

    monkeypatch.setattr(shard, "BATCH_MAX_ROWS", 2)
    root = write_topk_cache(tmp_path / "c", units=1, rows_per_unit=5)
    info = open_cache(root).shard_infos[0]
    assert pa.ipc.open_file(str(root / info.name)).num_record_batches == 3
    reader = open_cache(root)
    batches = list(reader.iter_batches())
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [reader.read_row(0, i).sample_id for i in (4, 0, 3)] == ["u0-r4", "u0-r0", "u0-r3"]


def test_reader_is_fork_safe_and_picklable(tmp_path: Path) -> None:
    import multiprocessing as mp
    import pickle

    global _FORKED_READER
    root = write_topk_cache(tmp_path / "c", units=2, rows_per_unit=3)
    reader = open_cache(root)
    reader.read_row(0, 0)  # the parent holds shard 0 open while forking
    _FORKED_READER = reader
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_child_ids, args=(i, out)) for i in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [got[i] for i in range(2)] == [[r.sample_id for r in reader.iter_rows(shards=[i])] for i in range(2)]
    clone = pickle.loads(pickle.dumps(reader))
    assert [r.sample_id for r in clone.iter_rows()] == [r.sample_id for r in reader.iter_rows()]


_FORKED_READER: object = None


def _child_ids(shard: int, out: object) -> None:
    rows = _FORKED_READER.iter_rows(shards=[shard])  # type: ignore[attr-defined]
    out.put((shard, [r.sample_id for r in rows]))  # type: ignore[attr-defined]
