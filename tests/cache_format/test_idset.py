"""``id_coding: "set"`` (format 1.1, SPEC §3.1.1): round trips, decoded invariants, hostile shards, writer options."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cache_format
from cache_format import CacheWriter, TopKBatch, TopKEncoding, open_cache, verify_cache
from cache_format.codec import id_bytes_for
from cache_format.encodings import check_batch
from cache_format.encodings.idset import (
    ESCAPE,
    SetCodingError,
    decode_set,
    encode_set,
    id_coding_of,
    pack_table,
    table_column,
    unpack_table,
)
from cache_format.errors import (
    EncodingError,
    IncompatibleCacheError,
    ManifestError,
    ShardCorruptError,
    UnsupportedVersionError,
    WriterStateError,
)
from cache_format.manifest import MANIFEST_NAME, validate_manifest
from cache_format.shard import (
    build_table,
    decode_batch,
    merge_blocks,
    read_shard_encoding,
    serialize_table,
    shard_encoding,
)
from helpers.cache import identity, topk_batch, write_topk_cache

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG_VOCAB = (1 << 24) + 1000  # needs 4 exception planes


def distinct_ids(rng: np.random.Generator, n: int, k: int, vocab: int, shape: str) -> np.ndarray:
    """[n, k] ids, distinct within each position (test data: a loop over positions is fine)."""
    if shape == "same":  # every position holds the same set, in a different order
        base = rng.choice(vocab, k, replace=False)
        return np.stack([rng.permutation(base) for _ in range(n)]) if n else np.zeros((0, k), np.int64)
    out = np.empty((n, k), np.int64)
    for t in range(n):
        if shape == "sparse":  # gaps >= 255 in rank space: escapes
            picked = np.unique(rng.integers(0, vocab, 4 * k))
        else:  # a Zipf-like head shared across positions plus a random tail
            picked = np.unique(np.concatenate([rng.zipf(1.3, k) % vocab, rng.integers(0, vocab, 2 * k)]))
        while len(picked) < k:
            picked = np.unique(np.concatenate([picked, rng.integers(0, vocab, k)]))
        out[t] = rng.permutation(picked)[:k]
    return out


@st.composite
def set_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    vocab = draw(st.sampled_from([1, 2, 300, 49_152, 70_000, 262_144, BIG_VOCAB]))
    k = draw(st.integers(1, min(vocab, 80)))
    n = draw(st.sampled_from([0, 1, 3, 40]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    ids = distinct_ids(rng, n, k, vocab, draw(st.sampled_from(["same", "sparse", "zipf"])))
    q = rng.integers(0, draw(st.sampled_from([1, 4, 256])), (n, k)).astype(np.uint8)  # 1, 4: many ties
    return ids, q, vocab


@SETTINGS
@given(set_case())
def test_set_coding_round_trips_pairs_in_the_spec_order(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    ids, q, vocab = case
    n, k = ids.shape
    nb = id_bytes_for(vocab)
    s = encode_set(ids, q, nb)
    table = unpack_table(np.frombuffer(pack_table(s.table, nb), np.uint8), nb)
    np.testing.assert_array_equal(table, s.table)
    assert len(np.unique(table)) == len(table) and (n == 0 or int(table.max()) < vocab)
    assert all(len(p) == len(s.escapes) for p in s.gap_x) and (s.gap[s.escapes] == ESCAPE).all()
    got_ids, got_q = decode_set(s, k)
    assert got_ids.shape == got_q.shape == (n, k)
    # The same (id, q) pairs per position ...
    np.testing.assert_array_equal(np.sort((ids.astype(np.int64) << 8) | q, axis=1),
                                  np.sort((got_ids.astype(np.int64) << 8) | got_q, axis=1))
    # ... in 1.0 order (q ascending = log-prob descending), the teacher's top-1 (the first entry of
    # smallest q) first, the other entries of equal q by ascending rank.
    rank = np.argsort(table)[np.searchsorted(np.sort(table), got_ids)] if n else got_ids
    assert (np.diff(got_q.astype(int), axis=1) >= 0).all()
    np.testing.assert_array_equal(got_ids[:, 0], ids[np.arange(n), np.argmin(q, axis=1)])
    tie = got_q[:, 1:] == got_q[:, :-1]
    tie[:, :1] = False
    assert (rank[:, 1:][tie] > rank[:, :-1][tie]).all()


def test_rank_table_orders_by_log2_count_class_then_id() -> None:
    ids = np.array([[7, 3, 9], [7, 3, 5], [7, 9, 2], [7, 1, 2]])  # counts: 7:4, 3:2, 9:2, 2:2, 5:1, 1:1
    s = encode_set(ids, np.zeros((4, 3), np.uint8), 2)
    assert s.table.tolist() == [7, 2, 3, 9, 1, 5]


def test_repeated_id_in_a_position_is_refused_by_the_writer(tmp_path: Path) -> None:
    batch = topk_batch(["a", "b"], k=4)
    batch.ids[13, 2] = batch.ids[13, 0]
    w = CacheWriter(tmp_path / "c", identity(TopKEncoding(k=4)))
    w.write(batch)
    with pytest.raises(EncodingError, match=r"ids at sample_id 'b' position 2: a token id repeats"):
        w.finalize()
    w.close()


@pytest.mark.parametrize(("vocab", "k", "lengths"), [(300, 1, [0, 1, 6]), (BIG_VOCAB, 5, [3, 0, 40]),
                                                     (49_152, 64, [1, 130, 0, 0])])
def test_writer_default_is_set_and_decodes_like_planes(tmp_path: Path, vocab: int, k: int, lengths: list[int]) -> None:
    rng = np.random.default_rng(vocab + k)
    inputs = [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]
    positions = [np.arange(max(n - 1, 0), dtype=np.int32) for n in lengths]
    n_pos = sum(len(p) for p in positions)
    lps = np.sort(np.log(rng.dirichlet(np.full(k, 0.3), n_pos) * 0.9 + 1e-12), axis=1)[:, ::-1].astype(np.float32)
    batch = TopKBatch(sample_ids=[f"s{i}" for i in range(len(lengths))], input_ids=inputs, positions=positions,
                      ids=distinct_ids(rng, n_pos, k, vocab, "sparse"), logprobs=np.ascontiguousarray(lps))
    rows = {}
    for coding in (None, "planes"):
        root = tmp_path / str(coding)
        with CacheWriter(root, identity(TopKEncoding(k=k), vocab=vocab), id_coding=coding) as w:
            w.write(batch)
            m = w.finalize()
        assert m["format_version"] == ("1.1" if coding is None else "1.0")
        assert m["shard_encoding"].get("id_coding") == ("set" if coding is None else None)
        verify_cache(root)
        rows[coding] = list(open_cache(root).iter_rows())
    for a, b in zip(rows[None], rows["planes"], strict=True):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        np.testing.assert_array_equal(a.tail, b.tail)
        np.testing.assert_array_equal(np.sort(a.ids, axis=1), np.sort(b.ids, axis=1))
    if n_pos:
        assert open_cache(tmp_path / "None").read_row(0, len(lengths) - 1).ids.shape[1] == k


# ---------------------------------------------------------------- hostile shards


def set_shard() -> bytes:
    """One shard: rows a, b (no positions), c of k=4 over vocab 300, then d, which holds every id 4 times,
    so the ids rank by ascending id and row a's first position [0, 299, 298, 297] has a rank gap of 296."""
    ident = identity(TopKEncoding(k=4), vocab=300)
    batch = topk_batch(["a", "b", "c"], k=4, vocab=300)
    batch.positions[1] = np.zeros(0, np.int32)
    batch.ids, batch.logprobs = batch.ids[:22], batch.logprobs[:22]
    batch.ids[0] = [0, 299, 298, 297]
    every = TopKBatch(sample_ids=["d"], input_ids=[np.arange(301, dtype=np.int32) % 300],
                      positions=[np.arange(300, dtype=np.int32)],
                      ids=(np.arange(300)[:, None] + np.arange(4)[None, :]) % 300,
                      logprobs=batch.logprobs[:1].repeat(300, 0))
    block = merge_blocks([check_batch(batch, ident), check_batch(every, ident)])
    return serialize_table(build_table(block, ident, shard_encoding(ident, "set")), 3)


def decode_all(blob: bytes) -> list[object]:
    reader = pa.ipc.open_file(pa.BufferReader(blob))
    enc = read_shard_encoding(reader.schema, "t")
    return decode_batch(reader.get_batch(0), enc, "t", 0, 0)


def tamper(blob: bytes, column: str, change: Callable[[list[list[int]]], None]) -> bytes:
    """The shard with one list column's rows rewritten by ``change`` (in place on Python lists)."""
    table = pa.ipc.open_file(pa.BufferReader(blob)).read_all()
    rows = table.column(column).to_pylist()
    change(rows)
    i = table.schema.get_field_index(column)
    field = table.schema.field(i)
    return serialize_table(table.set_column(i, field, pa.array(rows, field.type)), 3)


def with_table(blob: bytes, raw: bytes) -> bytes:
    table = pa.ipc.open_file(pa.BufferReader(blob)).read_all()
    i = table.schema.get_field_index("topk_id_table")
    return serialize_table(table.set_column(i, table.schema.field(i), table_column(raw, table.num_rows)), 3)


def _past_table(rows: list[list[int]]) -> None:
    rows[2][-4:] = [254] * 4  # row 2's last position: ranks 254, 509, ... of a 300-id table


def _escape_past_table(rows: list[list[int]]) -> None:
    rows[0][0] = 200  # row 0's first exception: a gap of 455


def _add_escape(rows: list[list[int]]) -> None:
    rows[0][4] = ESCAPE  # one 255 byte more than row 0 has exceptions


def _qoff_over(rows: list[list[int]]) -> None:
    rows[2][5] = 255  # row 2 position 1: qmax - 255 < 0 (qmax is far below 255 here)


def _top_past_run(rows: list[list[int]]) -> None:
    rows[2][3] = 60000  # row 2 position 3: far more than the entries tied at its top


HOSTILE = {
    "gap past table": ("topk_set_gap", _past_table, r"shard t row 2 \(sample_id 'c'\) position 10: column topk_set_gap the ranks walk past the "
                                                     r"300-id rank table; the shard is corrupt — re-dump it"),
    "exception past table": ("topk_set_gap_x0", _escape_past_table,
                             r"shard t row 0 \(sample_id 'a'\) position 0: column topk_set_gap_x0 an escaped rank gap walks past"),
    "escape count": ("topk_set_gap", _add_escape, r"shard t row 0: column topk_set_gap_x0 has 1 entries, expected 2"),
    "qoff > qmax": ("topk_qoff", _qoff_over, r"shard t row 2 \(sample_id 'c'\) position 1: column topk_qoff an offset exceeds topk_qmax"),
    "top past run": ("topk_top", _top_past_run, r"shard t row 2 \(sample_id 'c'\) position 3: column topk_top index 60000 is not below the number of entries tied at the top \(1\)"),
}


def test_the_test_shard_is_valid_and_uses_escapes() -> None:
    blob = set_shard()
    rows = decode_all(blob)
    assert [len(r.positions) for r in rows] == [11, 0, 11, 300]
    table = pa.ipc.open_file(pa.BufferReader(blob)).read_all()
    assert table.column("topk_set_gap").to_pylist()[0][:4] == [0, 255, 0, 0]
    assert table.column("topk_set_gap_x0").to_pylist()[0] == [296 - 255]
    assert sorted(rows[0].ids[0].tolist()) == [0, 297, 298, 299]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_streams_raise_one_clean_error(case: str) -> None:
    blob = set_shard()
    column, change, message = HOSTILE[case]
    with pytest.raises(ShardCorruptError, match=message):
        decode_all(tamper(blob, column, change))


@pytest.mark.parametrize(("raw", "message"), [
    (pack_table(np.array([5, 9, 5], np.int32), 2), "column topk_id_table lists a token id twice"),
    (b"\x01\x02\x03", "column topk_id_table 3 bytes is not a whole number of 2 byte planes"),
    (pack_table(np.array([1, 2], np.int32), 2), r"row 0 \(sample_id 'a'\) position 0: column topk_set_gap_x0 an escaped rank gap walks past the "
                                                r"2-id rank table"),
])
def test_hostile_rank_tables_raise_one_clean_error(raw: bytes, message: str) -> None:
    blob = set_shard()
    with pytest.raises(ShardCorruptError, match=message if "row " in message else f"shard t rows from 0: {message}"):
        decode_all(with_table(blob, raw))


def test_decode_set_rejects_mismatched_streams() -> None:
    s = encode_set(np.array([[3, 600], [2, 1]]), np.array([[1, 2], [3, 3]], np.uint8), 2)
    assert s.top.tolist() == [0, 1]  # position 1: 2 and 1 tie, 1 ranks first, the teacher listed 2 first
    assert decode_set(s, 2)[0].tolist() == [[3, 600], [2, 1]]
    with pytest.raises(SetCodingError, match="exceptions for"):
        decode_set(dataclasses.replace(s, gap_x=[np.zeros(1, np.uint8)] * 2), 2)
    with pytest.raises(SetCodingError, match="has 3 gaps"):
        decode_set(dataclasses.replace(s, gap=s.gap[:3]), 2)
    with pytest.raises(SetCodingError, match=r"index 2 is not below the number of entries tied at the top \(2\)"):
        decode_set(dataclasses.replace(s, top=np.array([0, 2], np.uint16)), 2)
    with pytest.raises(SetCodingError, match="id_bytes=0"):
        unpack_table(np.zeros(4, np.uint8), 0)


# ---------------------------------------------------------------- versions and writer options


def test_unknown_id_coding_is_refused_by_name(tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=1, rows_per_unit=2)
    m = json.loads((root / MANIFEST_NAME).read_text())
    m["shard_encoding"]["id_coding"] = "huffman"
    with pytest.raises(UnsupportedVersionError, match=r"shard_encoding: id_coding 'huffman' is unknown"):
        validate_manifest(m, "m")
    schema = json.loads((Path(cache_format.__file__).parent / "manifest.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):  # the JSON Schema agrees
        jsonschema.validate(m, schema)
    with pytest.raises(UnsupportedVersionError, match="upgrade kdpipe"):
        id_coding_of({"id_coding": "huffman"})
    assert issubclass(UnsupportedVersionError, ManifestError)


def test_resume_keeps_the_caches_id_coding(tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=1, rows_per_unit=2, id_coding="planes")
    before = (root / MANIFEST_NAME).read_bytes()
    with pytest.raises(IncompatibleCacheError, match="its shards use 'planes'; resume with id_coding='planes'"):
        CacheWriter(root, identity(TopKEncoding(k=8)), mode="resume", id_coding="set")
    assert (root / MANIFEST_NAME).read_bytes() == before  # refused before the cache was touched
    with CacheWriter(root, identity(TopKEncoding(k=8)), mode="resume") as w:
        w.write(topk_batch(["new"], k=8, seed=5))
        m = w.finalize()
    assert m["format_version"] == "1.0" and "id_coding" not in m["shard_encoding"]
    assert verify_cache(root)["rows"] == 3


def test_bad_id_coding_option_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(WriterStateError, match="id_coding must be one of 'planes', 'set', got 'rank'"):
        CacheWriter(tmp_path / "c", identity(), id_coding="rank")
    assert not (tmp_path / "c").exists()
