"""The Arrow shard layout: schema, building record batches from rows, decoding them back.

One Arrow row per sequence. Per-entry streams are ``list<uint8>`` columns so each byte
plane is its own buffer (zstd compresses each separately) and a whole record batch decodes
with a handful of numpy calls.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from cache_format import codec
from cache_format.batches import DecodedRow, RowBlock, make_locator
from cache_format.errors import EncodingError, ShardCorruptError, UnsupportedVersionError
from cache_format.identity import CacheIdentity

FORMAT_NAME = "kdpipe-logit-cache"
FORMAT_VERSION = "1.0"
FORMAT_MAJOR = 1
META_FORMAT = b"kdpipe.format"
META_VERSION = b"kdpipe.format_version"
META_ENCODING = b"kdpipe.encoding"
META_BATCH_ROWS = b"kdpipe.batch_rows"

# A record batch holds at most this many rows / target positions, so a reader decodes a bounded
# amount at a time (64k positions at k=64 decode to about 32 MB of ids+log-probs).
BATCH_MAX_ROWS = 1024
BATCH_MAX_POSITIONS = 65536

_LIST_U8 = pa.list_(pa.uint8())


def shard_encoding(identity: CacheIdentity) -> dict[str, Any]:
    """The codec parameters repeated in every shard's schema metadata."""
    d = identity.encoding.to_dict()
    if identity.encoding.kind != "class_logits":
        d["id_bytes"] = codec.id_bytes_for(identity.id_limit)
    return d


def shard_schema(enc: dict[str, Any], batch_rows: list[int] | None = None) -> pa.Schema:
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("positions", pa.list_(pa.int32()), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
    ]
    kind = enc["kind"]
    if kind == "topk":
        fields.append(pa.field("topk_values", _LIST_U8, nullable=False))
        fields += [pa.field(f"topk_id_b{b}", _LIST_U8, nullable=False) for b in range(enc["id_bytes"])]
        fields.append(pa.field("tail_code", pa.list_(pa.uint16()), nullable=False))
        fields.append(pa.field("norm_code", pa.list_(pa.int16()), nullable=False))
    elif kind == "sampled":
        fields.append(pa.field("sampled_num_unique", _LIST_U8, nullable=False))
        fields.append(pa.field("sampled_counts", _LIST_U8, nullable=False))
        fields += [pa.field(f"sampled_id_b{b}", _LIST_U8, nullable=False) for b in range(enc["id_bytes"])]
    else:
        fields.append(pa.field("class_logits", pa.list_(pa.float32()), nullable=False))
    meta = {META_FORMAT: FORMAT_NAME.encode(), META_VERSION: FORMAT_VERSION.encode(),
            META_ENCODING: json.dumps(enc, sort_keys=True).encode()}
    if batch_rows is not None:
        meta[META_BATCH_ROWS] = json.dumps(batch_rows).encode()
    return pa.schema(fields, metadata=meta)


def _list(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def merge_blocks(blocks: list[RowBlock]) -> RowBlock:
    """Concatenate blocks (rows in order) into one."""
    if len(blocks) == 1:
        return blocks[0]
    keys = blocks[0].payload.keys()
    return RowBlock(
        sample_ids=[s for b in blocks for s in b.sample_ids],
        input_ids=[a for b in blocks for a in b.input_ids],
        positions=[a for b in blocks for a in b.positions],
        labels=[x for b in blocks for x in b.labels],
        payload={k: np.concatenate([b.payload[k] for b in blocks]) for k in keys},
    )


def encode_block(block: RowBlock, identity: CacheIdentity, enc: dict[str, Any]) -> dict[str, pa.Array]:
    """All columns of ``block`` as Arrow arrays (one element per row)."""
    n_pos = np.array([len(p) for p in block.positions], dtype=np.int64)
    cols: dict[str, pa.Array] = {
        "sample_id": pa.array(block.sample_ids, pa.string()),
        "input_ids": _list(np.concatenate(block.input_ids) if block.input_ids else np.zeros(0, np.int32),
                           np.array([len(x) for x in block.input_ids], np.int64), pa.int32()),
        "positions": _list(np.concatenate(block.positions) if block.positions else np.zeros(0, np.int32),
                           n_pos, pa.int32()),
        "label": pa.array(block.labels, pa.int32()),
    }
    locate = make_locator(block.sample_ids, block.positions)
    kind = enc["kind"]
    if kind == "topk":
        k = enc["k"]
        e = codec.encode_topk(block.payload["ids"], block.payload["logprobs"], block.payload.get("tail"),
                              value_step=enc["value_step"], id_limit=identity.id_limit, locate=locate,
                              row_lengths=n_pos)
        cols["topk_values"] = _list(e.values, n_pos * k, pa.uint8())
        for b, plane in enumerate(e.id_planes):
            cols[f"topk_id_b{b}"] = _list(plane, n_pos * k, pa.uint8())
        cols["tail_code"] = _list(e.tail_code, n_pos, pa.uint16())
        cols["norm_code"] = _list(e.norm_code, n_pos, pa.int16())
    elif kind == "sampled":
        e2 = codec.encode_sampled(block.payload["draws"], num_draws=enc["num_draws"], id_limit=identity.id_limit,
                                  locate=locate)
        row_of_pos = np.repeat(np.arange(len(n_pos)), n_pos)
        per_row_unique = np.bincount(row_of_pos, weights=e2.num_unique, minlength=len(n_pos)).astype(np.int64)
        cols["sampled_num_unique"] = _list(e2.num_unique, n_pos, pa.uint8())
        cols["sampled_counts"] = _list(e2.counts, per_row_unique, pa.uint8())
        for b, plane in enumerate(e2.id_planes):
            cols[f"sampled_id_b{b}"] = _list(plane, per_row_unique, pa.uint8())
    else:
        logits = block.payload["logits"]
        bad = ~np.isfinite(logits)
        if bad.any():
            r = int(np.flatnonzero(bad.any(axis=1))[0])
            raise EncodingError(f"class logits of sample_id {block.sample_ids[r]!r} hold NaN or inf; "
                                "the teacher produced non-finite logits (check its dtype)")
        c = logits.shape[1]
        cols["class_logits"] = _list(logits.reshape(-1), np.full(len(block.sample_ids), c, np.int64), pa.float32())
    return cols


def batch_cuts(block: RowBlock) -> list[tuple[int, int]]:
    """Row ranges of the record batches: at most BATCH_MAX_ROWS rows and about BATCH_MAX_POSITIONS positions."""
    cuts, start, acc = [], 0, 0
    for i, n in enumerate([len(p) for p in block.positions]):
        acc += n
        if i + 1 - start >= BATCH_MAX_ROWS or acc >= BATCH_MAX_POSITIONS:
            cuts.append((start, i + 1))
            start, acc = i + 1, 0
    if start < block.num_rows or not cuts:
        cuts.append((start, block.num_rows))
    return cuts


def build_table(block: RowBlock, identity: CacheIdentity) -> pa.Table:
    """The whole shard as a table whose record batches follow :func:`batch_cuts`."""
    enc = shard_encoding(identity)
    cols = encode_block(block, identity, enc)
    cuts = batch_cuts(block)
    schema = shard_schema(enc, [b - a for a, b in cuts])
    arrays = [cols[f.name] for f in schema]
    batches = [pa.record_batch([a.slice(s, e - s) for a in arrays], schema=schema) for s, e in cuts]
    return pa.Table.from_batches(batches, schema=schema)


# ---------------------------------------------------------------- reading


def read_shard_encoding(schema: pa.Schema, shard: str) -> dict[str, Any]:
    """Check the shard's format metadata and return its encoding dict."""
    meta = schema.metadata or {}
    if meta.get(META_FORMAT) != FORMAT_NAME.encode():
        raise ShardCorruptError(f"shard {shard}: Arrow schema lacks kdpipe.format={FORMAT_NAME!r}; this file is not "
                                "a kdpipe cache shard (re-create it with kdpipe)")
    version = meta.get(META_VERSION, b"").decode(errors="replace")
    if version.split(".")[0] != str(FORMAT_MAJOR):
        raise UnsupportedVersionError(f"shard {shard}: format version {version!r} has an unknown major version; "
                                      f"this library reads {FORMAT_MAJOR}.x — upgrade kdpipe")
    try:
        enc = json.loads(meta[META_ENCODING])
    except (KeyError, ValueError):
        raise ShardCorruptError(f"shard {shard}: schema metadata kdpipe.encoding is missing or not JSON") from None
    if not isinstance(enc, dict):
        raise ShardCorruptError(f"shard {shard}: schema metadata kdpipe.encoding must be a JSON object")
    return enc


def _lists(batch: pa.RecordBatch, name: str, shard: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets rebased to 0) of a list column, zero-copy where possible."""
    col = batch.column(name)
    if col.null_count:
        raise ShardCorruptError(f"shard {shard}: column {name} has null rows; the spec forbids nulls there")
    offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return values, offsets - offsets[0]


def _split(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def _expect_lengths(offsets: np.ndarray, expected: np.ndarray, name: str, shard: str, first_row: int) -> None:
    got = np.diff(offsets)
    if not np.array_equal(got, expected):
        r = int(np.flatnonzero(got != expected)[0])
        raise ShardCorruptError(f"shard {shard} row {first_row + r}: column {name} has {int(got[r])} entries, "
                                f"expected {int(expected[r])}; the shard is corrupt — re-dump it")


def decode_batch(batch: pa.RecordBatch, enc: dict[str, Any], shard: str, shard_index: int,
                 first_row: int) -> list[DecodedRow]:
    """Decode every row of a record batch (vectorized across the batch)."""
    names = set(batch.schema.names)
    needed = {"sample_id", "input_ids", "positions"}
    kind = enc.get("kind")
    id_bytes = int(enc.get("id_bytes", 0))
    if kind == "topk":
        needed |= {"topk_values", "tail_code", "norm_code"} | {f"topk_id_b{b}" for b in range(id_bytes)}
    elif kind == "sampled":
        needed |= {"sampled_num_unique", "sampled_counts"} | {f"sampled_id_b{b}" for b in range(id_bytes)}
    elif kind == "class_logits":
        needed |= {"class_logits"}
    else:
        raise ShardCorruptError(f"shard {shard}: unknown encoding kind {kind!r} in schema metadata")
    missing = sorted(needed - names)
    if missing:
        raise ShardCorruptError(f"shard {shard}: missing column(s) {', '.join(missing)}; the shard is corrupt "
                                "or from another format — re-dump it")
    n = batch.num_rows
    sids = batch.column("sample_id").to_pylist()
    labels = batch.column("label").to_pylist() if "label" in names else [None] * n
    in_vals, in_off = _lists(batch, "input_ids", shard)
    pos_vals, pos_off = _lists(batch, "positions", shard)
    inputs = _split(in_vals.astype(np.int32, copy=False), in_off)
    positions = _split(pos_vals.astype(np.int32, copy=False), pos_off)
    n_pos = np.diff(pos_off)
    rows: list[DecodedRow] = []
    if kind == "topk":
        k = int(enc["k"])
        vals, v_off = _lists(batch, "topk_values", shard)
        _expect_lengths(v_off, n_pos * k, "topk_values", shard, first_row)
        planes = []
        for b in range(id_bytes):
            p, p_off = _lists(batch, f"topk_id_b{b}", shard)
            _expect_lengths(p_off, n_pos * k, f"topk_id_b{b}", shard, first_row)
            planes.append(p)
        tc, tc_off = _lists(batch, "tail_code", shard)
        _expect_lengths(tc_off, n_pos, "tail_code", shard, first_row)
        nc, nc_off = _lists(batch, "norm_code", shard)
        _expect_lengths(nc_off, n_pos, "norm_code", shard, first_row)
        ids, lps, tail = codec.decode_topk(vals, planes, tc, nc, k=k, value_step=float(enc["value_step"]),
                                           row_offsets=v_off)
        for i in range(n):
            a, b2 = int(pos_off[i]), int(pos_off[i + 1])
            rows.append(DecodedRow(sids[i], inputs[i], positions[i], ids[a:b2], lps[a:b2], tail[a:b2],
                                   label=labels[i], shard_index=shard_index, row_index=first_row + i))
    elif kind == "sampled":
        nu, nu_off = _lists(batch, "sampled_num_unique", shard)
        _expect_lengths(nu_off, n_pos, "sampled_num_unique", shard, first_row)
        cum = np.concatenate([[0], np.cumsum(nu, dtype=np.int64)])
        per_row = cum[pos_off[1:]] - cum[pos_off[:-1]]
        cnt, cnt_off = _lists(batch, "sampled_counts", shard)
        _expect_lengths(cnt_off, per_row, "sampled_counts", shard, first_row)
        planes = []
        for b in range(id_bytes):
            p, p_off = _lists(batch, f"sampled_id_b{b}", shard)
            _expect_lengths(p_off, per_row, f"sampled_id_b{b}", shard, first_row)
            planes.append(p)
        num_draws = int(enc["num_draws"])
        for i in range(n):
            a, b2 = int(pos_off[i]), int(pos_off[i + 1])
            ca, cb = int(cnt_off[i]), int(cnt_off[i + 1])
            ids, counts, lps, tail = codec.decode_sampled(nu[a:b2], cnt[ca:cb], [p[ca:cb] for p in planes],
                                                          num_draws=num_draws)
            rows.append(DecodedRow(sids[i], inputs[i], positions[i], ids, lps, tail, counts=counts,
                                   label=labels[i], shard_index=shard_index, row_index=first_row + i))
    else:
        lv, l_off = _lists(batch, "class_logits", shard)
        c = int(enc["num_classes"])
        _expect_lengths(l_off, np.full(n, c), "class_logits", shard, first_row)
        logits = lv.astype(np.float32, copy=False).reshape(n, c)
        for i in range(n):
            rows.append(DecodedRow(sids[i], inputs[i], positions[i], None, None, None, label=labels[i],
                                   class_logits=logits[i], shard_index=shard_index, row_index=first_row + i))
    return rows

