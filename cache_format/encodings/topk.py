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
    check_token_row,
    list_array,
    plane_fields,
)
from cache_format.encodings.idset import decode_set_rows, encode_set_columns, id_coding_of, set_fields
from cache_format.errors import EncodingError, InvariantError
from cache_format.rows import DecodedRow, RowBlock, make_locator

# Largest k: the per-position value deltas are uint8 and k above a few hundred is never useful.
MAX_K = 4096
# Tolerance on the sum of a decoded top-k+tail distribution (float32 rounding of 129 terms).
SUM_TOLERANCE = 1e-3


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

    def decode(self, cols: ShardColumns, enc: dict[str, Any], pos_offsets: np.ndarray) -> list[dict[str, Any]]:
        if id_coding_of(enc) == "set":
            return decode_set_rows(cols, enc, pos_offsets)
        n_pos, k = np.diff(pos_offsets), int(enc["k"])
        values, v_off = cols.lists("topk_values", n_pos * k)
        planes = cols.planes("topk_id", int(enc.get("id_bytes", 0)), n_pos * k)
        tail_code, _ = cols.lists("tail_code", n_pos)
        norm_code, _ = cols.lists("norm_code", n_pos)
        ids, lps, tail = codec.decode_topk(values, planes, tail_code, norm_code, k=k,
                                           value_step=float(enc["value_step"]), row_offsets=v_off)
        cuts = zip(pos_offsets[:-1].tolist(), pos_offsets[1:].tolist(), strict=True)
        return [{"ids": ids[a:b], "logprobs": lps[a:b], "tail": tail[a:b]} for a, b in cuts]

    def check_row(self, row: DecodedRow, encoding: TopKEncoding, id_limit: int, where: str) -> None:
        ids, lp, tail = check_token_row(row, id_limit, where)
        if not np.isfinite(lp).all() or (lp > 1e-6).any():
            raise InvariantError(f"{where}: a log-prob is > 0 or non-finite")
        if lp.shape[1] > 1 and (np.diff(lp, axis=1) > 1e-6).any():
            raise InvariantError(f"{where}: log-probs are not sorted descending within a position")
        if ids.shape[1] > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
            raise InvariantError(f"{where}: a token id repeats within one position")
        total = np.exp(lp.astype(np.float64)).sum(axis=1) + tail
        if lp.size and np.abs(total - 1).max() > SUM_TOLERANCE:
            raise InvariantError(f"{where}: top-k + tail sums to {float(total.max()):.6f}, not 1")
