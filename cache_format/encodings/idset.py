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
from cache_format.rows import RowBlock, make_locator

# "planes": the 1.0 layout (also meant when a shard encoding has no id_coding); "set": this module.
ID_CODINGS = ("planes", "set")
DEFAULT_ID_CODING = "set"
# A gap byte of 255 means "gap >= 255; gap - 255 is the row's next exception".
ESCAPE = 255
TABLE = "topk_id_table"
GAP = "topk_set_gap"
QMAX = "topk_qmax"
QOFF = "topk_qoff"
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


def build_rank_table(ids: np.ndarray) -> np.ndarray:
    """The distinct ids by descending ⌊log2 count⌋, then ascending id (int32).

    Coarse classes instead of exact counts: on SmolLM2 the gaps are as small (51.3 vs 52.1
    B/position) and the delta-coded table is 40% smaller, because ids ascend within a class.
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
    """Set-code ``ids`` int [n, k] with their quantized values ``q`` uint8 [n, k] (any entry order).

    Raises SetCodingError (column ``ids``) when an id repeats within a position.
    """
    n = len(ids)
    table = build_rank_table(ids)
    wide = np.int64 if len(table) >= 1 << 23 else np.int32  # rank << 8 must fit
    key = (rank_lookup(ids, table).astype(wide) << 8) | q.astype(wide)
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
                      qoff=(qmax[:, None] - qs).reshape(-1))


def pack_table(table: np.ndarray, id_bytes: int) -> bytes:
    """The table's bytes: ids delta-coded modulo 2^(8·id_bytes), as ``id_bytes`` planes one after another."""
    mask = (1 << (8 * id_bytes)) - 1
    deltas = np.diff(table.astype(np.int64), prepend=0) & mask
    return b"".join(p.tobytes() for p in split_planes(deltas, id_bytes))


def unpack_table(raw: np.ndarray, id_bytes: int) -> np.ndarray:
    """Inverse of :func:`pack_table`; rejects a table that is not a whole number of planes or repeats an id."""
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


def decode_set(table: np.ndarray, gap: np.ndarray, gap_x: list[np.ndarray], qmax: np.ndarray, qoff: np.ndarray,
               k: int, escapes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 [n, k] and q uint8 [n, k] in 1.0 order (q ascending; equal q by ascending rank).

    The streams must have n*k gap/qoff bytes and one exception per 255 byte (the caller checks
    per-row lengths); a rank past the table or a qoff above qmax raises SetCodingError.
    ``escapes``: ``flatnonzero(gap == 255)`` if the caller has it already.
    """
    n, m = len(qmax), len(table)
    if gap.size != n * k or qoff.size != n * k:
        raise SetCodingError(GAP, -1, f"has {gap.size} gaps and {qoff.size} offsets for {n} positions of k={k}")
    esc = np.flatnonzero(gap == ESCAPE) if escapes is None else escapes
    if any(len(p) != esc.size for p in gap_x):
        raise SetCodingError(f"{GAP}_x0", -1, f"holds {len(gap_x[0])} exceptions for {esc.size} escape bytes")
    wide = np.int32 if k * (m + 1) < 1 << 31 else np.int64  # the running rank stays below k·m once gaps < m
    g = gap.astype(wide)
    if esc.size:
        x = join_planes(gap_x)
        if int(x.max()) >= m - ESCAPE:
            pos = int(esc[np.flatnonzero(x >= m - ESCAPE)[0]]) // k
            raise SetCodingError(f"{GAP}_x0", pos, f"an escaped rank gap walks past the {m}-id rank table")
        g[esc] += x.astype(wide)
    if g.size and int(g.max()) >= m:
        pos = int(np.flatnonzero(g >= m)[0]) // k
        raise SetCodingError(GAP, pos, f"a rank gap walks past the {m}-id rank table")
    g += 1
    g = g.reshape(n, k)
    np.cumsum(g, axis=1, out=g)
    g -= 1
    if n and int(g[:, -1].max()) >= m:
        raise SetCodingError(GAP, int(np.flatnonzero(g[:, -1] >= m)[0]), f"the ranks walk past the {m}-id rank table")
    qo = qoff.reshape(n, k)
    if n and (qo.max(axis=1) > qmax).any():
        raise SetCodingError(QOFF, int(np.flatnonzero(qo.max(axis=1) > qmax)[0]), "an offset exceeds topk_qmax")
    # One sort restores the order: the key is (q, rank), and ranks ascend within a position.
    rank_bits = 24 if m <= 1 << 24 else 32
    key = (qmax[:, None] - qo).astype(np.uint32 if rank_bits == 24 else np.uint64) << rank_bits
    key |= g.astype(key.dtype, copy=False)
    key.sort(axis=1)
    return table[key & ((1 << rank_bits) - 1)], (key >> rank_bits).astype(np.uint8)


# ---------------------------------------------------------------- Arrow columns


def set_fields(id_bytes: int) -> list[pa.Field]:
    """The set coding's columns in schema order; tail_code/norm_code end them, as in 1.0."""
    return [pa.field(TABLE, pa.dictionary(pa.int32(), pa.binary()), nullable=True),
            pa.field(GAP, LIST_U8, nullable=False),
            *[pa.field(f"{GAP}_x{b}", LIST_U8, nullable=False) for b in range(id_bytes)],
            pa.field(QMAX, LIST_U8, nullable=False), pa.field(QOFF, LIST_U8, nullable=False),
            pa.field("tail_code", pa.list_(pa.uint16()), nullable=False),
            pa.field("norm_code", pa.list_(pa.int16()), nullable=False)]


def _per_row(flat_index: np.ndarray, entry_offsets: np.ndarray) -> np.ndarray:
    """How many of the sorted flat entry indices fall in each row."""
    return np.diff(np.searchsorted(flat_index, entry_offsets)).astype(np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


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
    indices = pa.array(np.zeros(block.num_rows, np.int32), mask=np.arange(block.num_rows) > 0)
    cols = {TABLE: pa.DictionaryArray.from_arrays(indices, pa.array([pack_table(s.table, id_bytes)], pa.binary())),
            GAP: list_array(s.gap, n_pos * k, pa.uint8())}
    x_counts = _per_row(s.escapes, _offsets(n_pos * k))
    for b, plane in enumerate(s.gap_x):
        cols[f"{GAP}_x{b}"] = list_array(plane, x_counts, pa.uint8())
    cols[QMAX] = list_array(s.qmax, n_pos, pa.uint8())
    cols[QOFF] = list_array(s.qoff, n_pos * k, pa.uint8())
    cols["tail_code"] = list_array(t.tail_code, n_pos, pa.uint16())
    cols["norm_code"] = list_array(t.norm_code, n_pos, pa.int16())
    return cols


def read_table(cols: ShardColumns, id_bytes: int) -> np.ndarray:
    """The shard's rank table: the only value of the ``topk_id_table`` dictionary."""
    col = cols.batch.column(TABLE)
    if not (pa.types.is_dictionary(col.type) and pa.types.is_binary(col.type.value_type)):
        raise SetCodingError(TABLE, -1, f"has type {col.type}, expected dictionary<int32, binary>")
    if len(col.dictionary) != 1 or not col.dictionary[0].is_valid:
        raise SetCodingError(TABLE, -1, f"dictionary has {len(col.dictionary)} values, expected exactly one")
    return unpack_table(np.frombuffer(col.dictionary[0].as_buffer(), np.uint8), id_bytes)


def decode_set_rows(cols: ShardColumns, enc: dict[str, Any], pos_offsets: np.ndarray) -> list[dict[str, Any]]:
    """Per row, ``ids`` int32 [n, k], ``logprobs`` float32 [n, k] (descending) and ``tail`` float32 [n]."""
    n_pos, k, id_bytes = np.diff(pos_offsets), int(enc["k"]), int(enc["id_bytes"])
    try:
        table = read_table(cols, id_bytes)
        gap, g_off = cols.lists(GAP, n_pos * k)
        escapes = np.flatnonzero(gap == ESCAPE)
        gap_x = [cols.lists(f"{GAP}_x{b}", _per_row(escapes, g_off))[0] for b in range(id_bytes)]
        ids, q = decode_set(table, gap, gap_x, cols.lists(QMAX, n_pos)[0], cols.lists(QOFF, n_pos * k)[0], k,
                            escapes)
    except SetCodingError as exc:
        row = "" if exc.position < 0 else \
            f" row {cols.first_row + int(np.searchsorted(pos_offsets, exc.position, side='right')) - 1}"
        raise ShardCorruptError(f"shard {cols.shard}{row}: column {exc.column} {exc.detail}; the shard is corrupt "
                                "— re-dump it") from None
    tail_code, _ = cols.lists("tail_code", n_pos)
    norm_code, _ = cols.lists("norm_code", n_pos)
    logprobs = np.multiply(q, np.float32(-float(enc["value_step"])), dtype=np.float32)
    logprobs -= (norm_code.astype(np.float32) * np.float32(1.0 / codec.NORM_SCALE))[:, None]
    tail = codec.decode_tail(tail_code).astype(np.float32)
    cuts = zip(pos_offsets[:-1].tolist(), pos_offsets[1:].tolist(), strict=True)
    return [{"ids": ids[a:b], "logprobs": logprobs[a:b], "tail": tail[a:b]} for a, b in cuts]
