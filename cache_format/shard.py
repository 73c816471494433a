"""The Arrow shard layout: schema, record batches from rows, IPC bytes, decoding them back.

The columns every shard has are here; each encoding's own columns come from ``encodings/``.
One Arrow row per sequence. Per-entry streams are ``list<uint8>`` columns so each byte
plane is its own buffer (zstd compresses each separately) and a whole record batch decodes
with a handful of numpy calls.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import pyarrow as pa

from cache_format import codec
from cache_format.encodings import ENCODINGS
from cache_format.encodings.base import ARROW_ERRORS, ShardColumns, list_array
from cache_format.encodings.idset import id_coding_of
from cache_format.errors import EncodingError, ShardCorruptError, UnsupportedVersionError
from cache_format.identity import CacheIdentity
from cache_format.rows import BatchRows, DecodedRow, RowBlock, check_common

FORMAT_NAME = "kdpipe-logit-cache"
# The newest version written; a shard or manifest declares the oldest version that describes it
# (see format_version): caches written without 1.1 features declare 1.0 and read with any 1.0 reader
# (their top-k normaliser code is chosen by the 1.1 rule, which decodes by the unchanged 1.0 formula).
FORMAT_VERSION = "1.1"
FORMAT_MAJOR = 1
META_FORMAT = b"kdpipe.format"
META_VERSION = b"kdpipe.format_version"
META_ENCODING = b"kdpipe.encoding"
META_BATCH_ROWS = b"kdpipe.batch_rows"

# A record batch holds at most this many rows / target positions, so a reader decodes a bounded
# amount at a time (64k positions at k=64 decode to about 32 MB of ids+log-probs).
BATCH_MAX_ROWS = 1024
BATCH_MAX_POSITIONS = 65536
# The spec's columns of one record batch decompress to at most this many bytes (SPEC §5.1): a reader
# cap that holds whatever a hostile manifest claims. The writer's batches stay far below it
# (65,536 positions at k=64 are ~17 MB); only rows of millions of tokens could reach it.
MAX_BATCH_BYTES = 1 << 31

# Columns every shard has, whatever its encoding; the encoding's own columns follow them.
_COMMON_FIELDS = (
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("positions", pa.list_(pa.int32()), nullable=False),
    pa.field("label", pa.int32(), nullable=True),
)


def shard_encoding(identity: CacheIdentity, id_coding: str = "planes") -> dict[str, Any]:
    """The codec parameters repeated in every shard's schema metadata.

    ``id_coding`` applies to ``topk`` only: ``"planes"`` (1.0, no ``id_coding`` key) or ``"set"`` (1.1).
    """
    d = identity.encoding.to_dict()
    if ENCODINGS[identity.encoding.kind].per_position:
        d["id_bytes"] = codec.id_bytes_for(identity.id_limit)
    if identity.encoding.kind == "topk" and id_coding != "planes":
        d["id_coding"] = id_coding
    return d


def format_version(enc: dict[str, Any]) -> str:
    """The format version a cache with shard encoding ``enc`` declares: 1.1 only where it needs 1.1."""
    return "1.1" if enc.get("id_coding") == "set" else "1.0"


def check_encoding_version(enc: dict[str, Any], where: str) -> None:
    """Reject an encoding this library cannot decode although its major version is known (a later minor)."""
    if enc.get("kind") == "topk":
        id_coding_of(enc, where)


def shard_schema(enc: dict[str, Any], batch_rows: list[int] | None = None) -> pa.Schema:
    fields = [*_COMMON_FIELDS, *ENCODINGS[enc["kind"]].fields(enc)]
    meta = {META_FORMAT: FORMAT_NAME.encode(), META_VERSION: format_version(enc).encode(),
            META_ENCODING: json.dumps(enc, sort_keys=True).encode()}
    if batch_rows is not None:
        meta[META_BATCH_ROWS] = json.dumps(batch_rows).encode()
    return pa.schema(fields, metadata=meta)


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


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int32)


def encode_block(block: RowBlock, identity: CacheIdentity, enc: dict[str, Any]) -> dict[str, pa.Array]:
    """All columns of ``block`` as Arrow arrays (one element per row)."""
    cols: dict[str, pa.Array] = {
        "sample_id": pa.array(block.sample_ids, pa.string()),
        "input_ids": list_array(_concat(block.input_ids), np.array([len(x) for x in block.input_ids], np.int64),
                                pa.int32()),
        "positions": list_array(_concat(block.positions), block.positions_per_row(), pa.int32()),
        "label": pa.array(block.labels, pa.int32()),
    }
    cols.update(ENCODINGS[enc["kind"]].encode(block, enc, identity.id_limit))
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


def build_table(block: RowBlock, identity: CacheIdentity, enc: dict[str, Any] | None = None) -> pa.Table:
    """The whole shard as a table whose record batches follow :func:`batch_cuts` (``enc``: default 1.0 planes)."""
    enc = shard_encoding(identity) if enc is None else enc
    cols = encode_block(block, identity, enc)
    cuts = batch_cuts(block)
    schema = shard_schema(enc, [b - a for a, b in cuts])
    arrays = [cols[f.name] for f in schema]
    batches = [pa.record_batch([a.slice(s, e - s) for a in arrays], schema=schema) for s, e in cuts]
    for (s, e), batch in zip(cuts, batches, strict=True):
        if batch.nbytes > MAX_BATCH_BYTES:
            raise EncodingError(f"rows {block.sample_ids[s]!r}..{block.sample_ids[e - 1]!r} take {batch.nbytes} bytes "
                                f"in one record batch, over the format's {MAX_BATCH_BYTES}-byte cap; split these "
                                "sequences into shorter chunks")
    return pa.Table.from_batches(batches, schema=schema)


def serialize_table(table: pa.Table, compression_level: int) -> bytes:
    """The Arrow IPC file bytes of ``table`` with zstd-compressed buffers."""
    # use_threads=False: compression runs on the writer's own thread only, leaving cores to the teacher.
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=compression_level),
                                  use_threads=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=opts) as w:
        for b in table.to_batches():
            w.write_batch(b)
    return sink.getvalue().to_pybytes()


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
    except (KeyError, ValueError, RecursionError):
        raise ShardCorruptError(f"shard {shard}: schema metadata kdpipe.encoding is missing or not JSON") from None
    if not isinstance(enc, dict):
        raise ShardCorruptError(f"shard {shard}: schema metadata kdpipe.encoding must be a JSON object")
    check_encoding_version(enc, f"shard {shard}: schema metadata kdpipe.encoding")
    return enc


def check_schema(schema: pa.Schema, enc: dict[str, Any], shard: str) -> dict[str, int]:
    """Field index of each of the spec's columns in ``schema``: present once, with exactly the spec's type.

    Other columns are allowed (readers ignore them); ``label`` is optional.
    """
    kind = enc.get("kind")
    if not isinstance(kind, str) or kind not in ENCODINGS:
        raise ShardCorruptError(f"shard {shard}: unknown encoding kind {kind!r} in schema metadata")
    found, missing = {}, []
    for f in _spec_fields(json.dumps(enc, sort_keys=True)):
        where = schema.get_all_field_indices(f.name)
        if not where:
            if f.name != "label":
                missing.append(f.name)
            continue
        got = schema.field(where[0]).type
        if len(where) > 1 or not _same_type(got, f.type):
            raise ShardCorruptError(f"shard {shard}: column {f.name} is {_shown(got)} ({len(where)} column(s) of that name), "
                                    f"but the spec says one column of type {f.type}; the shard is corrupt or from "
                                    "another format — re-dump it")
        found[f.name] = where[0]
    if missing:
        raise ShardCorruptError(f"shard {shard}: missing column(s) {', '.join(missing)}; the shard is corrupt "
                                "or from another format — re-dump it")
    return found


@functools.lru_cache(maxsize=64)
def _spec_fields(enc_json: str) -> tuple[pa.Field, ...]:
    # Cached: every record batch is checked, and building the schema costs more than checking it.
    return tuple(shard_schema(json.loads(enc_json)))


def _shown(x: object) -> str:
    """``x`` as text safe for a terminal: Arrow types and errors quote field names a hostile shard chooses."""
    from cache_format.manifest import printable  # here: manifest imports this module

    return printable(str(x), 300)


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    # List child names differ between Arrow writers ("item", "element"); only the value type matters.
    if pa.types.is_list(want):
        return pa.types.is_list(got) and _same_type(got.value_type, want.value_type)
    return bool(got == want)


def decode_batch(batch: pa.RecordBatch, enc: dict[str, Any], shard: str, shard_index: int,
                 first_row: int, *, id_limit: int | None = None) -> list[DecodedRow]:
    """Decode every row of a record batch (vectorized across the batch), checking the spec's row rules.

    A row that breaks a rule raises ``InvariantError`` naming the shard, row, sample id and
    position; a malformed column raises ``ShardCorruptError``. ``id_limit``: the identity's id
    limit (default: the largest id the shard's byte planes hold).
    """
    check_schema(batch.schema, enc, shard)
    fmt = ENCODINGS[enc["kind"]]
    if id_limit is None and fmt.per_position:
        id_limit = 1 << (8 * int(enc.get("id_bytes", 4)))
    cols = ShardColumns(batch, shard, first_row)
    try:
        ctx, inputs = _decode_common(cols, id_limit or 0)
        parts = fmt.decode(cols, enc, ctx)
        labels = batch.column("label").to_pylist() if "label" in batch.schema.names else [None] * batch.num_rows
    except ARROW_ERRORS as exc:
        raise ShardCorruptError(f"shard {shard} rows {first_row}..{first_row + batch.num_rows - 1} cannot be "
                                f"decoded ({_shown(f'{type(exc).__name__}: {exc}')}); re-copy or re-dump the "
                                "cache") from exc
    positions = _split(ctx.positions, ctx.pos_offsets)
    return [DecodedRow(ctx.sample_ids[i], inputs[i], positions[i], label=labels[i], shard_index=shard_index,
                       row_index=first_row + i, **parts[i]) for i in range(batch.num_rows)]


def _decode_common(cols: ShardColumns, id_limit: int) -> tuple[BatchRows, list[np.ndarray]]:
    """The columns every encoding has, checked: sample ids, input ids and target positions."""
    sids, lengths = cols.strings("sample_id")
    in_vals, in_off = cols.lists("input_ids")
    pos_vals, pos_off = cols.lists("positions")
    ctx = BatchRows(cols.shard, cols.first_row, sids, pos_off, pos_vals.astype(np.int32, copy=False), id_limit)
    check_common(ctx, lengths, in_vals, in_off)
    return ctx, _split(in_vals.astype(np.int32, copy=False), in_off)


def _split(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
