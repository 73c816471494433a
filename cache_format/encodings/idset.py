"""``topk`` with ``id_coding: "set"`` (format 1.1, SPEC §3.1.1): each position's ids as a set of table ranks.

A shard carries one *rank table* (its distinct ids, frequent ones first). Each position's k
entries are stored in *set order* (ascending rank): the ranks gap-coded into bytes with 255 as an
escape to little-endian exception planes, and the quantized values as offsets from the position's
largest one. Decoding restores the 1.0 entry order (q ascending = log-prob descending; equal q by
ascending rank). The first half of this module is pure numpy (no per-position Python loop); the
second maps it onto the shard's Arrow columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cache_format import codec
from cache_format.encodings.base import LIST_U8, ShardColumns, list_array
from cache_format.errors import EncodingError, ShardCorruptError, UnsupportedVersionError
from cache_format.rows import BatchRows, RowBlock, make_locator

# "planes": the 1.0 layout (also meant when a shard encoding has no id_coding); "set": this module.
ID_CODINGS = ("planes", "set")
# Why "set" for new caches: 23% fewer bytes on SmolLM2 at the same KL (SPEC §3.1.1, measurements).
DEFAULT_ID_CODING = "set"
# A gap byte of 255 means "gap >= 255; gap - 255 is the row's next exception".
ESCAPE = 255
TABLE = "topk_id_table"
GAP = "topk_set_gap"
QMAX = "topk_qmax"
QOFF = "topk_qoff"
TOP = "topk_top"
# The table is a dictionary batch: SPEC §5.1 caps a shard's dictionaries at 16 MiB (5.5M ids at 3 bytes).
MAX_TABLE_BYTES = 16 * 1024 * 1024
# Below this many distinct-id slots per stored id, id -> rank goes through a dense lookup array;
# above it (huge vocabularies, few positions) through a sort, so memory follows the data, not the vocab.
_DENSE_SLOTS_PER_ID = 8


def id_coding_of(enc: dict[str, Any], where: str = "shard_encoding") -> str:
    """The id coding of a ``topk`` shard encoding; an unknown one raises UnsupportedVersionError."""
    coding = enc.get("id_coding", "planes")
    if coding not in ID_CODINGS:
        raise UnsupportedVersionError(f"{where}: id_coding {coding!r} is unknown; this library reads "
                                      + " and ".join(repr(c) for c in ID_CODINGS) + " — upgrade kdpipe")
    return str(coding)


class SetCodingError(ValueError):
    """A set-coded stream is inconsistent; ``position`` is the flat position index (-1: the table)."""

    def __init__(self, column: str, position: int, detail: str) -> None:
        super().__init__(f"{column}: {detail}")
        self.column, self.position, self.detail = column, position, detail


# ---------------------------------------------------------------- pure numpy


@dataclass
class SetStreams:
    table: np.ndarray  # int32 [m]: rank -> token id
    gap: np.ndarray  # uint8 [n*k]: min(rank gap, 255), set order
    gap_x: list[np.ndarray]  # id_bytes x uint8 [e]: (gap - 255) as little-endian planes, one per escape
    escapes: np.ndarray  # int64 [e]: flat entry index of each escape (for the per-row exception counts)
    qmax: np.ndarray  # uint8 [n]: the largest q of each position
    qoff: np.ndarray  # uint8 [n*k]: qmax - q, set order
    top: np.ndarray  # uint16 [n]: where the most probable entry sits in the run of smallest q (rank order)


def build_rank_table(ids: np.ndarray) -> np.ndarray:
    """The distinct ids by descending ⌊log2 count⌋, then ascending id (int32).

    Coarse classes instead of exact counts: on SmolLM2 the gaps are even a little smaller (51.3
    vs 52.1 B/position) and the delta-coded table is 40% smaller, because ids ascend within a class.
    """
    flat = ids.reshape(-1)
    if flat.size and int(flat.max()) < _DENSE_SLOTS_PER_ID * flat.size + 65536:
        counts = np.bincount(flat)
        present = np.flatnonzero(counts)
        counts = counts[present]
    else:
        present, counts = np.unique(flat, return_counts=True)
    log_class = np.frexp(counts.astype(np.float64))[1]  # floor(log2 count) + 1, exact for integers
    return present[np.argsort(-log_class, kind="stable")].astype(np.int32)


def rank_lookup(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The rank of every id of ``ids`` (each MUST be in ``table``), int32, same shape."""
    if not table.size:
        return np.zeros(ids.shape, np.int32)
    top = int(table.max())
    if top < _DENSE_SLOTS_PER_ID * ids.size + 65536:
        rank_of = np.zeros(top + 1, np.int32)
        rank_of[table] = np.arange(len(table), dtype=np.int32)
        return rank_of[ids]
    order = np.argsort(table, kind="stable")
    return order[np.searchsorted(table[order], ids)].astype(np.int32)


def split_planes(x: np.ndarray, n_bytes: int) -> list[np.ndarray]:
    """uint8 little-endian planes of non-negative integers below 2^32."""
    u = np.ascontiguousarray(x, dtype="<u4").reshape(-1).view(np.uint8).reshape(-1, 4)
    return [np.ascontiguousarray(u[:, b]) for b in range(n_bytes)]


def join_planes(planes: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`split_planes` (int64)."""
    out = np.zeros(len(planes[0]) if planes else 0, np.int64)
    for b, p in enumerate(planes):
        out |= p.astype(np.int64) << (8 * b)
    return out


def encode_set(ids: np.ndarray, q: np.ndarray, id_bytes: int) -> SetStreams:
    """Set-code ``ids`` int [n, k] with their quantized values ``q`` uint8 [n, k].

    Any entry order; the teacher's most probable entry is the first one with the smallest q
    (entry 0 when the entries come sorted by log-prob). Raises SetCodingError (column ``ids``)
    when an id repeats within a position.
    """
    n = len(ids)
    table = build_rank_table(ids)
    wide = np.int64 if len(table) >= 1 << 23 else np.int32  # rank << 8 must fit
    ranks_in = rank_lookup(ids, table).astype(wide)
    top = _top_in_run(ranks_in, q)
    key = (ranks_in << 8) | q.astype(wide)
    key.sort(axis=1)
    ranks = key >> 8
    qs = (key & 255).astype(np.uint8)
    g = np.empty_like(ranks)
    if n:
        g[:, 0] = ranks[:, 0]
        np.subtract(ranks[:, 1:], ranks[:, :-1], out=g[:, 1:])
        g[:, 1:] -= 1
    if g.size and int(g.min()) < 0:
        raise SetCodingError("ids", int(np.flatnonzero((g < 0).any(axis=1))[0]), "a token id repeats within a "
                             "position; top-k ids must be distinct")
    g = g.reshape(-1)
    escapes = np.flatnonzero(g >= ESCAPE)
    qmax = qs.max(axis=1) if n else np.zeros(0, np.uint8)
    return SetStreams(table=table, gap=np.minimum(g, ESCAPE).astype(np.uint8),
                      gap_x=split_planes(g[escapes] - ESCAPE, id_bytes), escapes=escapes, qmax=qmax,
                      qoff=(qmax[:, None] - qs).reshape(-1), top=top)


def _top_in_run(ranks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per position, how many entries of the smallest q have a lower rank than the most probable one.

    The decoded order puts equal q in rank order; this index brings the teacher's top-1 back to the
    front, so entry 0 stays the teacher's argmax as in 1.0 (5% of SmolLM2's positions tie at the top).
    """
    if not q.size:
        return np.zeros(len(q), np.uint16)
    first = np.argmin(q, axis=1)  # the first entry of the smallest q
    rows = np.arange(len(q))
    in_run = q == q[rows, first][:, None]
    return (in_run & (ranks < ranks[rows, first][:, None])).sum(axis=1).astype(np.uint16)


def pack_table(table: np.ndarray, id_bytes: int) -> bytes:
    """The table's bytes: ids delta-coded modulo 2^(8·id_bytes), as ``id_bytes`` planes one after another."""
    mask = (1 << (8 * id_bytes)) - 1
    deltas = np.diff(table.astype(np.int64), prepend=0) & mask
    return b"".join(p.tobytes() for p in split_planes(deltas, id_bytes))


def unpack_table(raw: np.ndarray, id_bytes: int) -> np.ndarray:
    """Inverse of :func:`pack_table`; rejects a table that is not a whole number of planes or repeats an id."""
    if id_bytes not in (2, 3, 4):
        raise SetCodingError(TABLE, -1, f"cannot be read with id_bytes={id_bytes!r} (the encoding allows 2, 3 or 4)")
    if raw.size % id_bytes:
        raise SetCodingError(TABLE, -1, f"{raw.size} bytes is not a whole number of {id_bytes} byte planes")
    m = raw.size // id_bytes
    planes = raw.reshape(id_bytes, m)
    table = np.cumsum(join_planes(list(planes))) & ((1 << (8 * id_bytes)) - 1)
    if m and int(table.max()) >= 1 << 31:
        raise SetCodingError(TABLE, -1, f"holds token id {int(table.max())}, beyond int32")
    if m > 1:
        top = int(table.max())
        dup = np.bincount(table).max() > 1 if top < _DENSE_SLOTS_PER_ID * m + 65536 else \
            bool((np.diff(np.sort(table)) == 0).any())
        if dup:
            raise SetCodingError(TABLE, -1, "lists a token id twice")
    return table.astype(np.int32)


def decode_set(s: SetStreams, k: int) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 [n, k] and q uint8 [n, k] in the spec's order (q ascending; equal q by ascending rank,
    except that ``top`` brings the teacher's most probable entry to the front).

    ``s.escapes`` is ``flatnonzero(s.gap == 255)``; the caller checks per-row lengths. A rank past
    the table, a qoff above qmax or a ``top`` beyond its run raises SetCodingError.
    """
    table, gap, esc, n, m = s.table, s.gap, s.escapes, len(s.qmax), len(s.table)
    if gap.size != n * k or s.qoff.size != n * k or s.top.size != n:
        raise SetCodingError(GAP, -1, f"has {gap.size} gaps, {s.qoff.size} offsets and {s.top.size} top indices "
                             f"for {n} positions of k={k}")
    if any(len(p) != esc.size for p in s.gap_x):
        raise SetCodingError(f"{GAP}_x0", -1, f"holds {len(s.gap_x[0])} exceptions for {esc.size} escape bytes")
    wide = np.int32 if k * (m + 1) < 1 << 31 else np.int64  # the running rank stays below k·m once gaps < m
    g = np.add(gap, 1, dtype=wide)  # gap + 1: the step from one rank to the next
    if esc.size:
        x = join_planes(s.gap_x)
        if int(x.max()) >= m - ESCAPE:
            pos = int(esc[np.flatnonzero(x >= m - ESCAPE)[0]]) // k
            raise SetCodingError(f"{GAP}_x0", pos, f"an escaped rank gap walks past the {m}-id rank table")
        g[esc] += x.astype(wide)
    if g.size and int(g.max()) > m:
        pos = int(np.flatnonzero(g > m)[0]) // k
        raise SetCodingError(GAP, pos, f"a rank gap walks past the {m}-id rank table")
    g = g.reshape(n, k)
    np.cumsum(g, axis=1, out=g)
    g -= 1
    if n and int(g[:, -1].max()) >= m:
        raise SetCodingError(GAP, int(np.flatnonzero(g[:, -1] >= m)[0]), f"the ranks walk past the {m}-id rank table")
    qo = s.qoff.reshape(n, k)
    if n and (qo.max(axis=1) > s.qmax).any():
        raise SetCodingError(QOFF, int(np.flatnonzero(qo.max(axis=1) > s.qmax)[0]), "an offset exceeds topk_qmax")
    # One sort gives the order: the key is (q, rank), and ranks ascend within a position.
    rank_bits, key_type = (24, np.uint32) if m <= 1 << 24 else (32, np.uint64)
    key = (s.qmax[:, None] - qo).astype(key_type)
    np.left_shift(key, rank_bits, out=key)
    key |= g.view(np.uint32) if key_type == np.uint32 and g.dtype == np.int32 else g.astype(key_type)
    key.sort(axis=1)
    ids, q = np.take(table, key & ((1 << rank_bits) - 1)), (key >> rank_bits).astype(np.uint8)
    return _top_first(ids, q, s.top), q


def _top_first(ids: np.ndarray, q: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Move entry ``top[t]`` of each position's leading run of equal q to the front (only ids move)."""
    rows = np.flatnonzero(top)
    if not rows.size:
        return ids
    r = top[rows].astype(np.int64)[:, None]
    run = (q[rows] == q[rows, :1]).sum(axis=1)
    if (r[:, 0] >= run).any():
        i = int(np.flatnonzero(r[:, 0] >= run)[0])
        raise SetCodingError(TOP, int(rows[i]), f"index {int(r[i, 0])} is not below the number of entries tied "
                             f"at the top ({int(run[i])})")
    j = np.arange(ids.shape[1])[None, :]
    ids[rows] = np.take_along_axis(ids[rows], np.where(j == 0, r, np.where(j <= r, j - 1, j)), axis=1)
    return ids


# ---------------------------------------------------------------- Arrow columns


def set_fields(id_bytes: int) -> list[pa.Field]:
    """The set coding's columns in schema order; tail_code/norm_code end them, as in 1.0."""
    return [pa.field(TABLE, pa.dictionary(pa.int32(), pa.binary()), nullable=False),
            pa.field(GAP, LIST_U8, nullable=False),
            *[pa.field(f"{GAP}_x{b}", LIST_U8, nullable=False) for b in range(id_bytes)],
            pa.field(QMAX, LIST_U8, nullable=False), pa.field(QOFF, LIST_U8, nullable=False),
            pa.field(TOP, pa.list_(pa.uint16()), nullable=False),
            pa.field("tail_code", pa.list_(pa.uint16()), nullable=False),
            pa.field("norm_code", pa.list_(pa.int16()), nullable=False)]


def set_max_entries(enc: dict[str, Any], positions: int) -> dict[str, int]:
    """Per list column, the most values ``positions`` target positions allow (SPEC §5.1)."""
    per_entry = positions * int(enc["k"])
    return {GAP: per_entry, **{f"{GAP}_x{b}": per_entry for b in range(int(enc["id_bytes"]))}, QMAX: positions,
            QOFF: per_entry, TOP: positions, "tail_code": positions, "norm_code": positions}


def _per_row(flat_index: np.ndarray, entry_offsets: np.ndarray) -> np.ndarray:
    """How many of the sorted flat entry indices fall in each row."""
    return np.diff(np.searchsorted(flat_index, entry_offsets)).astype(np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def table_column(table: bytes, rows: int) -> pa.DictionaryArray:
    """``topk_id_table``: dictionary [table, empty]; the shard's first row refers to the table, the others to empty.

    No nulls (every spec column has none), and a row-wise reader (HF datasets, ``to_pylist``)
    sees the table once per shard instead of once per row.
    """
    if len(table) > MAX_TABLE_BYTES:
        raise EncodingError(f"the shard's rank table would take {len(table)} bytes, over the {MAX_TABLE_BYTES}-byte "
                            "dictionary limit of SPEC §5.1; write smaller shards (max_shard_bytes) or id_coding='planes'")
    indices = np.ones(rows, np.int32)
    indices[:1] = 0
    return pa.DictionaryArray.from_arrays(pa.array(indices), pa.array([table, b""], pa.binary()))


def encode_set_columns(block: RowBlock, enc: dict[str, Any], id_limit: int) -> dict[str, pa.Array]:
    """The set coding's columns (plus tail_code/norm_code) for every row of ``block``: one table for all."""
    n_pos, k, id_bytes = block.positions_per_row(), int(enc["k"]), int(enc["id_bytes"])
    locate = make_locator(block.sample_ids, block.positions)
    t = codec.quantize_topk(block.payload["ids"], block.payload["logprobs"], block.payload.get("tail"),
                            value_step=enc["value_step"], id_limit=id_limit, locate=locate)
    try:
        s = encode_set(t.ids, t.q, id_bytes)
    except SetCodingError as exc:
        raise EncodingError(f"ids at {locate(exc.position)}: {exc.detail}") from None
    cols = {TABLE: table_column(pack_table(s.table, id_bytes), block.num_rows),
            GAP: list_array(s.gap, n_pos * k, pa.uint8())}
    x_counts = _per_row(s.escapes, _offsets(n_pos * k))
    for b, plane in enumerate(s.gap_x):
        cols[f"{GAP}_x{b}"] = list_array(plane, x_counts, pa.uint8())
    cols[QMAX] = list_array(s.qmax, n_pos, pa.uint8())
    cols[QOFF] = list_array(s.qoff, n_pos * k, pa.uint8())
    cols[TOP] = list_array(s.top, n_pos, pa.uint16())
    cols["tail_code"] = list_array(t.tail_code, n_pos, pa.uint16())
    cols["norm_code"] = list_array(t.norm_code, n_pos, pa.int16())
    return cols


def read_table(cols: ShardColumns, id_bytes: int) -> np.ndarray:
    """The shard's rank table: value 0 of the ``topk_id_table`` dictionary (any record batch, any slice)."""
    col = cols.batch.column(TABLE)
    if not (pa.types.is_dictionary(col.type) and pa.types.is_binary(col.type.value_type)):
        raise SetCodingError(TABLE, -1, f"has type {col.type}, expected dictionary<int32, binary>")
    if not len(col.dictionary) or not col.dictionary[0].is_valid:
        raise SetCodingError(TABLE, -1, "has no table (its dictionary's value 0 is missing)")
    return unpack_table(np.frombuffer(col.dictionary[0].as_buffer(), np.uint8), id_bytes)


def decode_set_columns(cols: ShardColumns, enc: dict[str, Any], ctx: BatchRows
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids int32 [n, k], log-probs float32 [n, k] and tail float32 [n] of a record batch (SPEC §3.1.1)."""
    n_pos, k, id_bytes = np.diff(ctx.pos_offsets), int(enc["k"]), int(enc.get("id_bytes", 0))
    try:
        table = read_table(cols, id_bytes)
        gap, g_off = cols.lists(GAP, n_pos * k)
        escapes = np.flatnonzero(gap == ESCAPE)
        streams = SetStreams(table=table, gap=gap, escapes=escapes, qmax=cols.lists(QMAX, n_pos)[0],
                             gap_x=[cols.lists(f"{GAP}_x{b}", _per_row(escapes, g_off))[0] for b in range(id_bytes)],
                             qoff=cols.lists(QOFF, n_pos * k)[0], top=cols.lists(TOP, n_pos)[0])
        ids, q = decode_set(streams, k)
    except SetCodingError as exc:
        where = f"shard {cols.shard} rows from {cols.first_row}" if exc.position < 0 else ctx.position(exc.position)
        raise ShardCorruptError(f"{where}: column {exc.column} {exc.detail}; the shard is corrupt — re-dump "
                                "it") from None
    tail_code, _ = cols.lists("tail_code", n_pos)
    norm_code, _ = cols.lists("norm_code", n_pos)
    logprobs = np.multiply(q, np.float32(-float(enc["value_step"])), dtype=np.float32)
    logprobs -= (norm_code.astype(np.float32) * np.float32(1.0 / codec.NORM_SCALE))[:, None]
    return ids, logprobs, codec.decode_tail(tail_code).astype(np.float32)
