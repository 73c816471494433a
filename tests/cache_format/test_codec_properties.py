"""Property-based round trips (hypothesis) of the three encodings, edge cases included.

Encode → Arrow → decode runs in memory through the same functions the writer and reader use.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_format import (
    ClassLogitsBatch,
    ClassLogitsEncoding,
    SampledBatch,
    SampledEncoding,
    TopKBatch,
    TopKEncoding,
)
from cache_format.codec import MAX_VALUE_CODE
from cache_format.encodings import check_batch
from cache_format.shard import build_table, decode_batch, read_shard_encoding, serialize_table
from helpers.cache import identity

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def roundtrip(batch: object, ident: object) -> list:
    table = build_table(check_batch(batch, ident), ident)  # type: ignore[arg-type]
    blob = serialize_table(table, 3)
    reader = pa.ipc.open_file(pa.BufferReader(blob))
    enc = read_shard_encoding(reader.schema, "t")
    rows, first = [], 0
    for b in range(reader.num_record_batches):
        rb = reader.get_batch(b)
        rows += decode_batch(rb, enc, "t", 0, first)
        first += rb.num_rows
    return rows


@st.composite
def topk_case(draw: st.DrawFn) -> tuple[TopKBatch, object, float]:
    vocab = draw(st.sampled_from([5, 300, 70_000]))  # 70k needs a third id byte plane
    k = draw(st.integers(1, min(vocab, 20)))
    step = draw(st.sampled_from([0.125, 0.0625, 0.5]))
    lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=5))  # 0 = empty row, 1 = no target
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]
    positions = []
    for n in lengths:  # sparse targets: a random strictly increasing subset
        positions.append(np.flatnonzero(rng.random(n) < 0.7).astype(np.int32) if n else np.zeros(0, np.int32))
    n_pos = sum(len(p) for p in positions)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n_pos)]) if n_pos else np.zeros((0, k), int)
    scale = draw(st.sampled_from([0.1, 3.0, 40.0]))  # flat, typical, extremely peaked (hits the floor)
    logits = rng.standard_normal((n_pos, k)) * scale
    mass = rng.uniform(0.05, 1.0, (n_pos, 1)) if draw(st.booleans()) else np.ones((n_pos, 1))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True) * mass
    lps = np.log(p).astype(np.float32)
    if draw(st.booleans()):  # unsorted input must be sorted by the encoder
        perm = rng.permutation(k)
        lps, ids = lps[:, perm], ids[:, perm]
    tail = None if draw(st.booleans()) else np.clip(1 - p.sum(axis=1), 0, 1)
    batch = TopKBatch(sample_ids=[f"s{i}" for i in range(len(lengths))], input_ids=inputs, positions=positions,
                      ids=ids.astype(np.int32), logprobs=lps, tail=tail,
                      labels=[None if i % 2 else i for i in range(len(lengths))])
    return batch, identity(TopKEncoding(k=k, value_step=step), vocab=vocab), step


@SETTINGS
@given(topk_case())
def test_topk_round_trip(case: tuple[TopKBatch, object, float]) -> None:
    batch, ident, step = case
    rows = roundtrip(batch, ident)
    assert [r.sample_id for r in rows] == list(batch.sample_ids)
    assert [r.label for r in rows] == list(batch.labels)  # type: ignore[arg-type]
    for r, x, p in zip(rows, batch.input_ids, batch.positions, strict=True):
        np.testing.assert_array_equal(r.input_ids, x)
        np.testing.assert_array_equal(r.positions, p)
    if not rows or sum(len(r.positions) for r in rows) == 0:
        return
    ids = np.concatenate([r.ids for r in rows])
    lp = np.concatenate([r.logprobs for r in rows]).astype(np.float64)
    tail = np.concatenate([r.tail for r in rows]).astype(np.float64)
    order = np.argsort(-batch.logprobs, axis=1, kind="stable")
    want_lp = np.take_along_axis(batch.logprobs, order, axis=1).astype(np.float64)
    np.testing.assert_array_equal(ids, np.take_along_axis(batch.ids, order, axis=1))
    # Documented worst case: |error| <= step (step/2 rounding + |normaliser| <= step/2), except
    # entries below the floor (-255 * step), which decode at the floor.
    floor = -MAX_VALUE_CODE * step
    above = want_lp > floor + step
    assert np.all(np.abs(lp - want_lp)[above] <= step + 2**-15 + 1e-5)
    assert np.all(lp <= 1e-6) and np.all(np.diff(lp, axis=1) <= 1e-6)
    assert np.all((tail >= 0) & (tail <= 1))
    np.testing.assert_allclose(np.exp(lp).sum(axis=1) + tail, 1.0, atol=3e-4)


@st.composite
def sampled_case(draw: st.DrawFn) -> tuple[SampledBatch, object]:
    vocab = draw(st.sampled_from([3, 1000, 70_000]))
    num_draws = draw(st.sampled_from([1, 7, 255]))
    lengths = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    inputs = [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]
    positions = [np.arange(max(n - 1, 0), dtype=np.int32) for n in lengths]
    n_pos = sum(len(p) for p in positions)
    draws = (rng.zipf(1.3, (n_pos, num_draws)) - 1) % vocab
    batch = SampledBatch(sample_ids=[str(i) for i in range(len(lengths))], input_ids=inputs, positions=positions,
                         draws=draws.astype(np.int32))
    return batch, identity(SampledEncoding(num_draws=num_draws), vocab=vocab)


@SETTINGS
@given(sampled_case())
def test_sampled_round_trip(case: tuple[SampledBatch, object]) -> None:
    batch, ident = case
    n_draws = ident.encoding.num_draws  # type: ignore[attr-defined]
    rows = roundtrip(batch, ident)
    flat = 0
    for r in rows:
        assert r.ids.shape == r.counts.shape == r.logprobs.shape
        for t in range(len(r.positions)):
            live = r.counts[t] > 0
            want_ids, want_counts = np.unique(batch.draws[flat], return_counts=True)
            got = dict(zip(r.ids[t][live].tolist(), r.counts[t][live].tolist(), strict=True))
            assert got == dict(zip(want_ids.tolist(), want_counts.tolist(), strict=True))
            # Order: count descending, then id ascending.
            keys = list(zip((-r.counts[t][live]).tolist(), r.ids[t][live].tolist(), strict=True))
            assert keys == sorted(keys)
            np.testing.assert_allclose(np.exp(r.logprobs[t][live]), r.counts[t][live] / n_draws, rtol=1e-6)
            assert np.all(r.logprobs[t][~live] == -1e9)
            flat += 1
        assert np.all(r.tail == 0)


@SETTINGS
@given(st.integers(1, 6), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_class_logits_round_trip(num_classes: int, n_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n_rows, num_classes)) * 10).astype(np.float32)
    labels = [int(x) if x < num_classes else None for x in rng.integers(0, num_classes + 1, n_rows)]
    ident = identity(ClassLogitsEncoding(num_classes=num_classes))
    rows = roundtrip(ClassLogitsBatch(sample_ids=[f"e{i}" for i in range(n_rows)], logits=logits, labels=labels),
                     ident)
    assert [r.label for r in rows] == labels
    if n_rows:
        np.testing.assert_array_equal(np.stack([r.class_logits for r in rows]), logits)
