"""``sampled``: tokens drawn with replacement from the teacher, stored as unique ids with counts (SPEC §3.2)."""

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
from cache_format.errors import EncodingError
from cache_format.rows import BatchRows, RowBlock, make_locator

# Largest draw count a ``sampled`` cache supports: counts are stored as uint8.
MAX_NUM_DRAWS = 255


@dataclass(frozen=True)
class SampledEncoding:
    """``num_draws`` tokens drawn with replacement from the full teacher distribution per position."""

    num_draws: int
    temperature: float = 1.0  # why: the sampling temperature at capture; 1.0 = the model's own distribution
    kind: ClassVar[str] = "sampled"

    def __post_init__(self) -> None:
        if not isinstance(self.num_draws, int) or not 1 <= self.num_draws <= MAX_NUM_DRAWS:
            raise EncodingError(
                f"SampledEncoding.num_draws must be an integer in [1, {MAX_NUM_DRAWS}] (counts are uint8), "
                f"got {self.num_draws!r}")
        check_temperature(self.temperature, "SampledEncoding")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_draws": self.num_draws, "temperature": float(self.temperature)}


@dataclass
class SampledBatch:
    """Rows of a ``sampled`` cache: ``draws`` are token ids drawn with replacement, [n_pos_total, num_draws]."""

    sample_ids: Sequence[str | int]
    input_ids: Sequence[np.ndarray]
    positions: Sequence[np.ndarray]
    draws: np.ndarray
    labels: Sequence[int | None] | None = None


class SampledFormat(EncodingFormat):
    kind = "sampled"
    params = SampledEncoding
    batch_type = SampledBatch

    def fields(self, enc: dict[str, Any]) -> list[pa.Field]:
        return [pa.field("sampled_num_unique", LIST_U8, nullable=False),
                pa.field("sampled_counts", LIST_U8, nullable=False),
                *plane_fields("sampled_id", int(enc.get("id_bytes", 0)))]

    def check_payload(self, batch: SampledBatch, encoding: SampledEncoding, block: RowBlock) -> dict[str, np.ndarray]:
        n_pos = block.num_positions
        draws = np.asarray(batch.draws)
        check_matrix(draws, (n_pos, encoding.num_draws), "SampledBatch.draws",
                     f"[total positions={n_pos}, num_draws={encoding.num_draws}]", integer=True)
        return {"draws": draws.astype(np.int32, copy=False)}

    def encode(self, block: RowBlock, enc: dict[str, Any], id_limit: int) -> dict[str, pa.Array]:
        n_pos = block.positions_per_row()
        e = codec.encode_sampled(block.payload["draws"], num_draws=enc["num_draws"], id_limit=id_limit,
                                 locate=make_locator(block.sample_ids, block.positions))
        row_of_pos = np.repeat(np.arange(len(n_pos)), n_pos)
        per_row_unique = np.bincount(row_of_pos, weights=e.num_unique, minlength=len(n_pos)).astype(np.int64)
        cols = {"sampled_num_unique": list_array(e.num_unique, n_pos, pa.uint8()),
                "sampled_counts": list_array(e.counts, per_row_unique, pa.uint8())}
        for b, plane in enumerate(e.id_planes):
            cols[f"sampled_id_b{b}"] = list_array(plane, per_row_unique, pa.uint8())
        return cols

    def max_entries(self, enc: dict[str, Any], rows: int, positions: int) -> dict[str, int]:
        most = positions * int(enc["num_draws"])  # at most N unique ids per position
        return {"sampled_num_unique": positions, "sampled_counts": most,
                **{f"sampled_id_b{b}": most for b in range(int(enc["id_bytes"]))}}

    def decode(self, cols: ShardColumns, enc: dict[str, Any], ctx: BatchRows) -> list[dict[str, Any]]:
        pos_offsets, num_draws = ctx.pos_offsets, int(enc["num_draws"])
        num_unique, _ = cols.lists("sampled_num_unique", np.diff(pos_offsets))
        cum = np.concatenate([[0], np.cumsum(num_unique, dtype=np.int64)])
        per_row = cum[pos_offsets[1:]] - cum[pos_offsets[:-1]]
        counts, c_off = cols.lists("sampled_counts", per_row)
        planes = cols.planes("sampled_id", int(enc.get("id_bytes", 0)), per_row)
        check_sampled(ctx, num_unique, counts, cum, num_draws)
        uids = codec.join_planes(planes) if len(counts) else np.zeros(0, np.int32)
        ctx.check_ids(uids, cum, "a sampled")
        rows = []
        for i in range(len(pos_offsets) - 1):
            a, b = int(pos_offsets[i]), int(pos_offsets[i + 1])
            ca, cb = int(c_off[i]), int(c_off[i + 1])
            ids, cnt, lps, tail = codec.decode_sampled(num_unique[a:b], counts[ca:cb], uids[ca:cb],
                                                       num_draws=num_draws)
            rows.append({"ids": ids, "logprobs": lps, "tail": tail, "counts": cnt})
        return rows


def check_sampled(ctx: BatchRows, num_unique: np.ndarray, counts: np.ndarray, cum: np.ndarray, num_draws: int) -> None:
    """Counts in [1, N] summing to N at every position (``cum``: running total of ``num_unique``)."""
    if not num_unique.size:
        return
    bad = np.flatnonzero((counts == 0) | (counts > num_draws))
    if bad.size:
        raise ctx.invalid(ctx.entry_position(cum, int(bad[0])), f"a sampled count is 0 or above num_draws={num_draws}")
    sums = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    ctx.check(sums[cum[1:]] - sums[cum[:-1]] != num_draws, f"sampled counts do not sum to num_draws={num_draws}")
