"""``topk``: the k most probable tokens per position, quantized log-probs and the tail mass (SPEC §3.1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from cache_format import codec
from cache_format.encodings.base import (
    LIST_U8,
    EncodingFormat,
    ShardColumns,
    check_matrix,
    check_temperature,
    list_array,
    plane_fields,
)
from cache_format.encodings.idset import (
    decode_set_columns,
    encode_set_columns,
    id_coding_of,
    set_fields,
    set_max_entries,
)
from cache_format.errors import EncodingError
from cache_format.rows import BatchRows, RowBlock, make_locator

# Largest k: the per-position value deltas are uint8 and k above a few hundred is never useful.
MAX_K = 4096
# SPEC §3.1: the k+1 decoded buckets sum to 1 within SUM_REL_TOLERANCE * tail + SUM_ABS_TOLERANCE.
# The relative part is the tail code's half step (e^(1/4096) - 1 = 2.44e-4); the absolute part covers
# float rounding: a 1.0 writer's float32 sums (< 2e-6) and this check's float32 exponentials (< 1e-6).
SUM_REL_TOLERANCE = 2.5e-4
SUM_ABS_TOLERANCE = 1e-5
# A decoded log-prob is at most 0 by construction (SPEC §3.1); this only absorbs float32 rounding.
LOGPROB_TOLERANCE = 1e-6


@dataclass(frozen=True)
class TopKEncoding:
    """The k most probable tokens per position with quantized log-probs and the tail mass.

    ``value_step`` is the log-prob quantization step in nats: a uniform error of at most
    step/2 per entry gives a mean KL of about step²/24 (6.5e-4 nats at 1/8, inside the
    1e-3 target), and 1/8 keeps the value deltas in few bits.
    """

    k: int
    value_step: float = 0.125  # why: see the docstring (KL ~ step²/24 < 1e-3 nats)
    temperature: float = 1.0  # why: the log-softmax temperature at capture; 1.0 = the model's own distribution
    kind: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise EncodingError(f"TopKEncoding.k must be an integer in [1, {MAX_K}], got {self.k!r}")
        if not (isinstance(self.value_step, int | float) and 0 < self.value_step <= 1):
            raise EncodingError(f"TopKEncoding.value_step must be in (0, 1] nats, got {self.value_step!r}")
        check_temperature(self.temperature, "TopKEncoding")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k, "value_step": float(self.value_step),
                "temperature": float(self.temperature)}


@dataclass
class TopKBatch:
    """Rows of a ``topk`` cache; ``ids``/``logprobs`` hold every row's positions concatenated in row order."""

    sample_ids: Sequence[str | int]
    input_ids: Sequence[np.ndarray]
    positions: Sequence[np.ndarray]
    ids: np.ndarray  # int [n_pos_total, k]
    logprobs: np.ndarray  # float [n_pos_total, k], log-softmax values
    tail: np.ndarray | None = None  # float [n_pos_total]; None: 1 - sum(exp(logprobs)) in float64
    labels: Sequence[int | None] | None = None


class TopKFormat(EncodingFormat):
    kind = "topk"
    params = TopKEncoding
    batch_type = TopKBatch

    def fields(self, enc: dict[str, Any]) -> list[pa.Field]:
        if id_coding_of(enc) == "set":  # format 1.1 (SPEC §3.1.1)
            return set_fields(int(enc.get("id_bytes", 0)))
        return [pa.field("topk_values", LIST_U8, nullable=False), *plane_fields("topk_id", int(enc.get("id_bytes", 0))),
                pa.field("tail_code", pa.list_(pa.uint16()), nullable=False),
                pa.field("norm_code", pa.list_(pa.int16()), nullable=False)]

    def check_payload(self, batch: TopKBatch, encoding: TopKEncoding, block: RowBlock) -> dict[str, np.ndarray]:
        n_pos, k = block.num_positions, encoding.k
        expected = f"[total positions={n_pos}, k={k}] (the rows' positions concatenated in row order)"
        ids, lps = np.asarray(batch.ids), np.asarray(batch.logprobs)
        check_matrix(ids, (n_pos, k), "TopKBatch.ids", expected, integer=True)
        check_matrix(lps, (n_pos, k), "TopKBatch.logprobs", expected)
        payload = {"ids": ids.astype(np.int32, copy=False), "logprobs": lps.astype(np.float32, copy=False)}
        if batch.tail is not None:
            tail = np.asarray(batch.tail, dtype=np.float64).reshape(-1)
            if tail.shape[0] != n_pos:
                raise EncodingError(f"TopKBatch.tail has {tail.shape[0]} values; expected one per position ({n_pos})")
            payload["tail"] = tail
        return payload

    def encode(self, block: RowBlock, enc: dict[str, Any], id_limit: int) -> dict[str, pa.Array]:
        if id_coding_of(enc) == "set":
            return encode_set_columns(block, enc, id_limit)
        n_pos, k = block.positions_per_row(), enc["k"]
        e = codec.encode_topk(block.payload["ids"], block.payload["logprobs"], block.payload.get("tail"),
                              value_step=enc["value_step"], id_limit=id_limit,
                              locate=make_locator(block.sample_ids, block.positions), row_lengths=n_pos)
        cols = {"topk_values": list_array(e.values, n_pos * k, pa.uint8())}
        for b, plane in enumerate(e.id_planes):
            cols[f"topk_id_b{b}"] = list_array(plane, n_pos * k, pa.uint8())
        cols["tail_code"] = list_array(e.tail_code, n_pos, pa.uint16())
        cols["norm_code"] = list_array(e.norm_code, n_pos, pa.int16())
        return cols

    def max_entries(self, enc: dict[str, Any], rows: int, positions: int) -> dict[str, int]:
        if id_coding_of(enc) == "set":
            return set_max_entries(enc, positions)
        k = int(enc["k"])
        return {"topk_values": positions * k, **{f"topk_id_b{b}": positions * k for b in range(int(enc["id_bytes"]))},
                "tail_code": positions, "norm_code": positions}

    def decode(self, cols: ShardColumns, enc: dict[str, Any], ctx: BatchRows) -> list[dict[str, Any]]:
        if id_coding_of(enc) == "set":
            # Distinct, sorted entries by construction (strictly increasing ranks of a duplicate-free table,
            # one sort by q): the row rules need not sort them again.
            return split_rows(ctx, *decode_set_columns(cols, enc, ctx), ordered=True)
        n_pos, k = np.diff(ctx.pos_offsets), int(enc["k"])
        values, v_off = cols.lists("topk_values", n_pos * k)
        planes = cols.planes("topk_id", int(enc.get("id_bytes", 0)), n_pos * k)
        tail_code, _ = cols.lists("tail_code", n_pos)
        norm_code, _ = cols.lists("norm_code", n_pos)
        ids, lps, tail = codec.decode_topk(values, planes, tail_code, norm_code, k=k,
                                           value_step=float(enc["value_step"]), row_offsets=v_off)
        return split_rows(ctx, ids, lps, tail)


def split_rows(ctx: BatchRows, ids: np.ndarray, lps: np.ndarray, tail: np.ndarray,
               ordered: bool = False) -> list[dict[str, Any]]:
    """The batch's decoded [n, k] arrays, checked against the row rules, cut into rows."""
    check_topk(ctx, ids, lps, tail, ordered)
    cuts = zip(ctx.pos_offsets[:-1].tolist(), ctx.pos_offsets[1:].tolist(), strict=True)
    return [{"ids": ids[a:b], "logprobs": lps[a:b], "tail": tail[a:b]} for a, b in cuts]


def check_topk(ctx: BatchRows, ids: np.ndarray, lps: np.ndarray, tail: np.ndarray, ordered: bool = False) -> None:
    """The spec's ``topk`` row rules over a whole batch of decoded positions ([n, k] arrays).

    Ids below the limit and distinct within a position; log-probs non-increasing and <= 0; top-k
    plus tail summing to 1 (which also catches a tail of 1 on top of real top-k mass). NaN/inf
    cannot come out of the integer codes, so finiteness needs no pass of its own. Each rule is
    one pass over contiguous memory; the per-position search runs only once a rule has failed.
    """
    if not lps.size:
        return
    k = ids.shape[1]
    ctx.check_ids(ids.reshape(-1), np.arange(ids.shape[0] + 1, dtype=np.int64) * k, "a top-k")
    if k > 1 and not ordered:  # ordered: the decoder guarantees distinct ids and descending log-probs
        ctx.check(_adjacent(np.sort(ids, axis=1), np.equal), "a token id repeats within the position's top-k")
        ctx.check(_adjacent(lps, np.greater), "top-k log-probs are not sorted descending")
    ctx.check(lps[:, 0] > LOGPROB_TOLERANCE, "a log-prob is above 0")
    # Summed in float64 (SPEC §3.1): a float32 sum of k terms can be off by k * 6e-8, over the bound at large k.
    # einsum casts while it sums: as fast as float32 BLAS, without a float64 copy of the matrix.
    total = np.einsum("ij->i", np.exp(lps), dtype=np.float64)
    total += tail
    bound = SUM_REL_TOLERANCE * tail.astype(np.float64) + SUM_ABS_TOLERANCE
    ctx.check(np.abs(total - 1.0) > bound, "top-k probabilities plus the tail mass do not sum to 1 (SPEC §3.1 bound)")


def _adjacent(a: np.ndarray, op: np.ufunc) -> np.ndarray:
    """bool [n]: rows of ``a`` [n, k] where ``op(a[t, i + 1], a[t, i])`` holds for some i (False everywhere if none)."""
    flat = a.reshape(-1)
    hit = op(flat[1:], flat[:-1])
    hit[a.shape[1] - 1::a.shape[1]] = False  # pairs that straddle two positions
    if not hit.any():
        return np.zeros(0, dtype=bool)
    return np.append(hit, False).reshape(a.shape).any(axis=1)
