"""Basic write → read round trips of the three encodings through the public API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cache_helpers import (
    class_batch,
    make_class_identity,
    make_sampled_identity,
    sampled_batch,
    topk_batch,
    write_topk_cache,
)

from cache_format import CacheWriter, open_cache, verify_cache


def test_topk_round_trip_is_close_and_normalised(tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=2, rows_per_unit=3)
    reader = open_cache(root)
    rows = list(reader.iter_rows())
    assert [r.sample_id for r in rows] == [f"u{u}-r{i}" for u in range(2) for i in range(3)]
    exact = topk_batch([f"u0-r{i}" for i in range(3)], seed=0)
    got = np.concatenate([r.logprobs for r in rows[:3]])
    np.testing.assert_array_equal(np.concatenate([r.ids for r in rows[:3]]), exact.ids)
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
