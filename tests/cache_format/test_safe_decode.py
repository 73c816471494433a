"""Hostile shards: each is rewritten with pyarrow from a valid cache, with the manifest's size and sha256
fixed up, so only the decoder's own checks can catch it. Every case must fail with a ``CacheError`` from
``iter_rows`` *and* from ``verify_cache`` (same rules), and never hand out a row or a traceback.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from cache_format import CacheError, CacheIdentity, CacheWriter, open_cache, verify_cache
from cache_format import _ipc_meta as ipc
from cache_format.codec import row_delta, row_undelta
from cache_format.errors import (
    CountMismatchError,
    DuplicateError,
    EncodingError,
    InvariantError,
    ShardCorruptError,
)
from helpers.cache import (
    class_batch,
    identity,
    make_class_identity,
    make_sampled_identity,
    sampled_batch,
    topk_batch,
    write_topk_cache,
)

SHARD0 = "shard-u000000000-p0000.arrow"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A private copy of one valid top-k cache (2 units x 4 rows), built once per session."""
    pristine = tmp_path_factory.getbasetemp() / "safe-decode-pristine"
    if not pristine.exists():
        write_topk_cache(pristine, units=2, id_coding="planes")  # the cases edit 1.0 columns (test_idset: 1.1's)
    return Path(shutil.copytree(pristine, tmp_path / "c"))


def fix_manifest(root: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Make the manifest agree with shard 0's new bytes (size, sha256, totals), as a careful attacker would."""
    m = json.loads((root / "manifest.json").read_text())
    data = (root / SHARD0).read_bytes()
    m["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    if edit is not None:
        edit(m)
    for key in ("rows", "tokens", "positions", "bytes"):
        m["totals"][key] = sum(s[key] for s in m["shards"])
    m["totals"]["shards"] = len(m["shards"])
    (root / "manifest.json").write_text(json.dumps(m))


def write_shard(root: Path, batches: list[pa.RecordBatch], schema: pa.Schema, *,
                batch_rows: list[int] | None = None) -> None:
    """Shard 0 := ``batches`` (zstd), with kdpipe.batch_rows set to their lengths unless given."""
    meta = dict(schema.metadata or {})
    meta[b"kdpipe.batch_rows"] = json.dumps(batch_rows or [b.num_rows for b in batches]).encode()
    schema = schema.with_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        for b in batches:
            w.write_batch(pa.record_batch(b.columns, schema=schema))
    (root / SHARD0).write_bytes(sink.getvalue().to_pybytes())
    fix_manifest(root)


def read_shard(root: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(root / SHARD0))).read_all()


def replace_column(root: Path, name: str, array: pa.Array, field_type: pa.DataType | None = None) -> None:
    """Shard 0 with column ``name`` replaced (one record batch)."""
    table = read_shard(root)
    i = table.schema.get_field_index(name)
    schema = table.schema.set(i, pa.field(name, field_type or array.type))
    cols = [array if j == i else table.column(j).combine_chunks() for j in range(table.num_columns)]
    write_shard(root, [pa.record_batch(cols, schema=schema)], schema)


def list_values(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    col = table.column(name).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).copy(), col.offsets.to_numpy()


def edit_list(root: Path, name: str, edit: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    """Shard 0 with the flat values of list column ``name`` replaced by ``edit(values, offsets)``."""
    table = read_shard(root)
    values, offsets = list_values(table, name)
    t = table.schema.field(name).type.value_type
    new = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(edit(values, offsets), t))
    replace_column(root, name, new, table.schema.field(name).type)


def edit_topk_codes(root: Path, edit: Callable[[np.ndarray, np.ndarray, np.ndarray], None], k: int = 8) -> None:
    """Shard 0 with its quantized codes q [n, k], norm codes and tail codes edited in place by ``edit``."""
    table = read_shard(root)
    values, v_off = list_values(table, "topk_values")
    q = row_undelta(values, v_off.astype(np.int64)).reshape(-1, k)
    norm, _ = list_values(table, "norm_code")
    tail, _ = list_values(table, "tail_code")
    edit(q, norm, tail)
    rows = np.diff(v_off)
    edit_list(root, "topk_values", lambda v, o: row_delta(q.reshape(-1), rows))
    edit_list(root, "norm_code", lambda v, o: norm)
    edit_list(root, "tail_code", lambda v, o: tail)


def assert_refused(root: Path, error: type[Exception] = CacheError, match: str = "") -> str:
    """Reading yields no row and raises ``error``; verify raises a CacheError too. Returns the message."""
    with pytest.raises(error, match=match) as info:
        for _ in open_cache(root).iter_rows():
            pass
    with pytest.raises(CacheError):
        verify_cache(root)
    message = str(info.value)
    assert "\n" not in message and "shard" in message
    return message


def peak_rss_mb(root: Path) -> float:
    """Peak RSS (MB) of a fresh interpreter that reads every row of the cache at ``root``."""
    code = ("import resource, sys; from cache_format import open_cache; "
            "n = sum(1 for _ in open_cache(sys.argv[1]).iter_rows()); "
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return int(out[1]) / 1024


# ---------------------------------------------------------------- sizes and structure


def test_unknown_column_bomb_is_never_decompressed(root: Path) -> None:
    """512 MiB of zeros in an unknown column (a few hundred KB on disk): ignored, as the spec says, at no cost."""
    clean_rss = peak_rss_mb(root)
    want = [(r.sample_id, r.ids.tolist()) for r in open_cache(root).iter_rows()]
    table = read_shard(root)
    per_row = (512 << 20) // table.num_rows
    zeros = np.zeros(per_row * table.num_rows, np.uint8)
    offsets = pa.array(np.arange(table.num_rows + 1, dtype=np.int32) * per_row)
    bomb = pa.ListArray.from_arrays(offsets, pa.array(zeros))
    schema = table.schema.insert(1, pa.field("zz_bomb", bomb.type))  # before the spec's columns, too
    cols = [c.combine_chunks() for c in table.columns]
    write_shard(root, [pa.record_batch([cols[0], bomb, *cols[1:]], schema=schema)], schema)
    assert (root / SHARD0).stat().st_size < 2 << 20
    assert [(r.sample_id, r.ids.tolist()) for r in open_cache(root).iter_rows()] == want
    assert verify_cache(root)["rows"] == len(want)
    assert peak_rss_mb(root) < clean_rss + 64


def test_two_million_empty_rows_refused_before_decoding(root: Path) -> None:
    n = 2_000_000
    table = read_shard(root)
    empty = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.int32()))
    cols = {f.name: empty.cast(f.type) if pa.types.is_list(f.type) else pa.nulls(n, f.type) for f in table.schema}
    cols["sample_id"] = pa.array(np.full(n, "x").astype(object), pa.string())
    write_shard(root, [pa.record_batch(list(cols.values()), schema=table.schema)], table.schema)
    fix_manifest(root, lambda m: m["shards"][0].update(rows=n, tokens=0, positions=0))
    assert_refused(root, ShardCorruptError, "batch_rows .*over 1024 rows")


def test_batch_longer_than_its_metadata_refused(root: Path) -> None:
    """kdpipe.batch_rows says 4 but the record batch holds 4,000 rows: caught from the message metadata."""
    table = read_shard(root)
    big = pa.concat_tables([table] * 1000).combine_chunks().to_batches()[0]
    write_shard(root, [big], table.schema, batch_rows=[table.num_rows])
    assert_refused(root, ShardCorruptError, "record batch 0: holds 4000 rows but kdpipe.batch_rows says 4")


def test_flipped_bit_in_buffer_length_refused(root: Path) -> None:
    """Bit 56 of a buffer's uncompressed length: Arrow would try to malloc 2^56 bytes."""
    data = bytearray((root / SHARD0).read_bytes())
    with open(root / SHARD0, "rb") as fh:
        _, blocks = ipc.read_footer_blocks(fh, len(data))
        meta = ipc.read_batch_meta(fh, blocks[0], len(data))
    off, _ = meta.buffers[-1]  # the last buffer: norm_code's values
    data[meta.body_offset + off + 7] ^= 0x01
    (root / SHARD0).write_bytes(bytes(data))
    fix_manifest(root)
    msg = assert_refused(root, ShardCorruptError, "record batch 0 column norm_code: buffer 3 decompresses to "
                                                  "72057594037")
    assert SHARD0 in msg


def test_dictionary_bomb_in_unknown_column_refused(root: Path) -> None:
    """Arrow reads every dictionary when a file is opened, so their size has a cap of its own."""
    table = read_shard(root)
    big = pa.array([np.zeros(32 << 20, np.uint8).tobytes()], pa.binary())
    extra = pa.DictionaryArray.from_arrays(pa.array(np.zeros(table.num_rows, np.int32)), big)
    schema = table.schema.append(pa.field("zz_dict", extra.type))
    cols = [c.combine_chunks() for c in table.columns] + [extra]
    write_shard(root, [pa.record_batch(cols, schema=schema)], schema)
    assert_refused(root, ShardCorruptError, "dictionary batches: decompress to")


def test_small_unknown_columns_anywhere_are_ignored(root: Path) -> None:
    want = [(r.sample_id, r.logprobs.tolist()) for r in open_cache(root).iter_rows()]
    table = read_shard(root)
    n = table.num_rows
    extras = {"a_struct": pa.array([{"x": i, "y": [1, 2]} for i in range(n)]),
              "b_str": pa.array([str(i) for i in range(n)]), "c_null": pa.nulls(n)}
    schema, cols = table.schema, [c.combine_chunks() for c in table.columns]
    for pos, (name, arr) in zip((0, 3, 6), extras.items(), strict=True):
        schema, cols = schema.insert(pos, pa.field(name, arr.type)), [*cols[:pos], arr, *cols[pos:]]
    write_shard(root, [pa.record_batch(cols, schema=schema)], schema)
    assert [(r.sample_id, r.logprobs.tolist()) for r in open_cache(root).iter_rows()] == want
    verify_cache(root)


@pytest.mark.parametrize(("name", "array_of"), [
    ("input_ids", lambda c: c.cast(pa.list_(pa.int64()))),
    ("sample_id", lambda c: c.cast(pa.binary())),
    ("tail_code", lambda c: c.cast(pa.list_(pa.float32()))),
    ("label", lambda c: c.cast(pa.int64())),
])
def test_wrong_column_type_refused(root: Path, name: str, array_of: Callable[[pa.Array], pa.Array]) -> None:
    replace_column(root, name, array_of(read_shard(root).column(name).combine_chunks()))
    assert_refused(root, ShardCorruptError, f"column {name} is .* but the spec says one column of type")


def test_nan_tail_as_float_column_refused(root: Path) -> None:
    table = read_shard(root)
    values, offsets = list_values(table, "tail_code")
    nan = np.full(len(values), np.nan, np.float32)
    replace_column(root, "tail_code", pa.ListArray.from_arrays(pa.array(offsets), pa.array(nan)))
    assert_refused(root, ShardCorruptError, "column tail_code is list<item: float>")


def test_non_utf8_sample_id_refused(root: Path) -> None:
    table = read_shard(root)
    ids = [s.encode() for s in table.column("sample_id").to_pylist()]
    ids[1] = b"\xff\xfe\x1b[2J"
    raw = pa.array(ids, pa.binary())
    bad = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    replace_column(root, "sample_id", bad)
    assert_refused(root, ShardCorruptError, "column sample_id.*(UTF8|utf-8)")


def test_null_sample_id_refused(root: Path) -> None:
    ids = read_shard(root).column("sample_id").to_pylist()
    replace_column(root, "sample_id", pa.array([None, *ids[1:]], pa.string()))
    assert_refused(root, ShardCorruptError, "column sample_id")


# ---------------------------------------------------------------- row rules


def test_positive_logprob_refused(root: Path) -> None:
    def edit(q: np.ndarray, norm: np.ndarray, tail: np.ndarray) -> None:
        q[3] -= q[3, 0]  # still sorted, top code 0 ...
        norm[3] = -32767  # ... minus a normaliser of -1 nat: log-prob +1

    edit_topk_codes(root, edit)
    msg = assert_refused(root, InvariantError, r"row 0 \(sample_id 'u0-r0'\) position 3: a log-prob is above 0")
    assert "re-dump" in msg


def test_tail_one_on_top_of_topk_mass_refused(root: Path) -> None:
    edit_topk_codes(root, lambda q, norm, tail: tail.__setitem__(12, 0))  # code 0: tail = 1
    assert_refused(root, InvariantError, r"row 1 \(sample_id 'u0-r1'\) position 1: top-k probabilities plus the "
                                         "tail mass do not sum to 1")


def test_unsorted_logprobs_refused(root: Path) -> None:
    edit_topk_codes(root, lambda q, norm, tail: q.__setitem__((5, slice(None)), q[5, ::-1].copy()))
    assert_refused(root, InvariantError, "position 5: top-k log-probs are not sorted descending")


def test_repeated_id_within_position_refused(root: Path) -> None:
    edit_list(root, "topk_id_b0", lambda v, o: np.concatenate([v[:1], v[:1], v[2:]]))
    edit_list(root, "topk_id_b1", lambda v, o: np.concatenate([v[:1], v[:1], v[2:]]))
    assert_refused(root, InvariantError, "position 0: a token id repeats")


def test_id_beyond_vocab_refused(root: Path) -> None:
    edit_list(root, "topk_id_b1", lambda v, o: np.where(np.arange(len(v)) == 100, 0xFF, v).astype(np.uint8))
    assert_refused(root, InvariantError, r"row 1 .* position 1: a top-k token id 65\d\d\d >= vocab size 1000")


def test_input_id_beyond_vocab_refused(root: Path) -> None:
    edit_list(root, "input_ids", lambda v, o: np.where(np.arange(len(v)) == 30, 5000, v).astype(np.int32))
    assert_refused(root, InvariantError, r"row 2 \(sample_id 'u0-r2'\): input_ids hold token id 5000")


@pytest.mark.parametrize(("edit", "rule"), [
    (lambda p: np.where(np.arange(len(p)) == 0, -1, p), "position -1: target position is negative"),
    (lambda p: np.concatenate([p[:11][::-1], p[11:]]), "position 9: target position does not follow the previous"),
    (lambda p: np.where(np.arange(len(p)) == 10, 12, p), "position 12: target position is not below the row's 12"),
    (lambda p: np.where(np.arange(len(p)) == 10, 9, p), "position 9: target position does not follow"),
], ids=["minus_one", "reversed", "past_row_end", "repeated"])
def test_bad_positions_refused(root: Path, edit: Callable[[np.ndarray], np.ndarray], rule: str) -> None:
    edit_list(root, "positions", lambda v, o: edit(v).astype(np.int32))
    assert_refused(root, InvariantError, r"row 0 \(sample_id 'u0-r0'\) " + rule)


def test_changed_value_step_in_shard_refused(root: Path) -> None:
    table = read_shard(root)
    meta = dict(table.schema.metadata)
    enc = json.loads(meta[b"kdpipe.encoding"])
    meta[b"kdpipe.encoding"] = json.dumps({**enc, "value_step": 0.25}).encode()
    schema = table.schema.with_metadata(meta)
    write_shard(root, table.to_batches(), schema)
    assert_refused(root, ShardCorruptError, "encoding .*0.25.* but the manifest says")


def test_changed_value_step_everywhere_refused(root: Path) -> None:
    """Shard and manifest agree on a step the values were not written with: the sums give it away."""
    table = read_shard(root)
    meta = dict(table.schema.metadata)
    meta[b"kdpipe.encoding"] = json.dumps({**json.loads(meta[b"kdpipe.encoding"]), "value_step": 0.25}).encode()
    write_shard(root, table.to_batches(), table.schema.with_metadata(meta))

    def edit(m: dict[str, Any]) -> None:
        m["identity"]["encoding"]["value_step"] = 0.25
        m["shard_encoding"]["value_step"] = 0.25

    fix_manifest(root, edit)
    assert_refused(root, InvariantError, "do not sum to 1")


def test_shard_claiming_more_entries_than_manifest_refused(root: Path) -> None:
    fix_manifest(root, lambda m: m["shards"][0].update(tokens=10))
    assert_refused(root, CountMismatchError, "column input_ids: holds 48 tokens but the manifest says 10")


def one_unit_cache(root: Path, ident: CacheIdentity, batch: Any) -> Path:
    with CacheWriter(root, ident) as w:
        w.write(batch)
        w.end_unit(0)
        w.finalize()
    return root


@pytest.fixture
def sampled_root(tmp_path: Path) -> Path:
    return one_unit_cache(tmp_path / "s", make_sampled_identity(16), sampled_batch([f"s{i}" for i in range(4)]))


def test_sampled_counts_not_summing_to_n_refused(sampled_root: Path) -> None:
    edit_list(sampled_root, "sampled_counts", lambda v, o: v ^ (np.arange(len(v)) == 0).astype(np.uint8))
    assert_refused(sampled_root, InvariantError, r"row 0 \(sample_id 's0'\) position 0: sampled count")


def test_sampled_id_beyond_vocab_refused(sampled_root: Path) -> None:
    edit_list(sampled_root, "sampled_id_b1", lambda v, o: np.full_like(v, 0x7F))
    assert_refused(sampled_root, InvariantError, "sampled token id .* >= vocab size 1000")


def test_sampled_valid_cache_reads(sampled_root: Path) -> None:
    assert verify_cache(sampled_root)["rows"] == 4


def test_class_logits_nan_refused(tmp_path: Path) -> None:
    root = one_unit_cache(tmp_path / "k", make_class_identity(3), class_batch([f"k{i}" for i in range(4)]))
    edit_list(root, "class_logits", lambda v, o: np.where(np.arange(len(v)) == 4, np.nan, v).astype(np.float32))
    assert_refused(root, InvariantError, r"row 1 \(sample_id 'k1'\): class logits are NaN")


def test_read_row_checks_its_row(root: Path) -> None:
    edit_list(root, "positions", lambda v, o: np.where(np.arange(len(v)) == 0, -1, v).astype(np.int32))
    reader = open_cache(root)
    assert reader.read_row(0, 1).sample_id == "u0-r1"
    with pytest.raises(InvariantError, match="row 0"):
        reader.read_row(0, 0)


def test_writer_refuses_overlong_sample_id(tmp_path: Path) -> None:
    with CacheWriter(tmp_path / "w", identity()) as w, pytest.raises(EncodingError, match="over 4096 bytes"):
        w.write(topk_batch(["x" * 5000]))


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_other_compressions_read_the_same(root: Path, compression: str | None) -> None:
    want = [(r.sample_id, r.logprobs.tolist(), r.tail.tolist()) for r in open_cache(root).iter_rows()]
    table = read_shard(root)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
        w.write_table(table)
    (root / SHARD0).write_bytes(sink.getvalue().to_pybytes())
    fix_manifest(root)
    assert [(r.sample_id, r.logprobs.tolist(), r.tail.tolist()) for r in open_cache(root).iter_rows()] == want
    verify_cache(root)


def test_sample_id_repeated_within_a_shard_refused(root: Path) -> None:
    ids = read_shard(root).column("sample_id").to_pylist()
    replace_column(root, "sample_id", pa.array([ids[0], ids[0], *ids[2:]], pa.string()))
    assert_refused(root, DuplicateError, r"sample_id 'u0-r0' appears twice in shard .* \(rows 0 and 1\)")


def test_byte_identical_shards_refused_on_open(root: Path) -> None:
    m = json.loads((root / "manifest.json").read_text())
    name2 = "shard-u000000002-p0000.arrow"
    shutil.copyfile(root / SHARD0, root / name2)
    m["shards"].append({**m["shards"][0], "name": name2, "unit": 2})
    m["units"].append(2)
    (root / "manifest.json").write_text(json.dumps(m))
    fix_manifest(root)
    with pytest.raises(DuplicateError, match=f"{SHARD0} and {name2} are byte-identical"):
        open_cache(root)
    with pytest.raises(DuplicateError):
        verify_cache(root)
