"""``class_logits``: one full float32 logit vector per row, for classification teachers (SPEC §3.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cache_format.encodings.base import (
    EncodingFormat,
    ShardColumns,
    check_matrix,
    check_temperature,
    list_array,
)
from cache_format.errors import EncodingError
from cache_format.rows import BatchRows, RowBlock


@dataclass(frozen=True)
class ClassLogitsEncoding:
    """Full float32 class logits per example (classification teachers)."""

    num_classes: int
    labels: tuple[str, ...] | list[str] | None = None
    temperature: float = 1.0  # why: logits are stored as produced; temperature is for the record only
    kind: ClassVar[str] = "class_logits"

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise EncodingError(f"ClassLogitsEncoding.num_classes must be a positive integer, got {self.num_classes!r}")
        if self.labels is not None:
            labels = tuple(str(x) for x in self.labels)
            if len(labels) != self.num_classes:
                raise EncodingError(
                    f"ClassLogitsEncoding.labels has {len(labels)} names but num_classes={self.num_classes}; "
                    "give one name per class or none")
            object.__setattr__(self, "labels", labels)
        check_temperature(self.temperature, "ClassLogitsEncoding")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes,
                "labels": list(self.labels) if self.labels is not None else None,
                "temperature": float(self.temperature)}


@dataclass
class ClassLogitsBatch:
    """Rows of a ``class_logits`` cache: one logit vector per row, [n_rows, num_classes]."""

    sample_ids: Sequence[str | int]
    logits: np.ndarray
    labels: Sequence[int | None] | None = None
    input_ids: Sequence[np.ndarray] | None = None  # optional: the tokens the classifier saw


class ClassLogitsFormat(EncodingFormat):
    kind = "class_logits"
    params = ClassLogitsEncoding
    batch_type = ClassLogitsBatch
    per_position = False

    def fields(self, enc: dict[str, Any]) -> list[pa.Field]:
        return [pa.field("class_logits", pa.list_(pa.float32()), nullable=False)]

    def check_payload(self, batch: ClassLogitsBatch, encoding: ClassLogitsEncoding,
                      block: RowBlock) -> dict[str, np.ndarray]:
        c = encoding.num_classes
        logits = np.asarray(batch.logits, dtype=np.float32)
        check_matrix(logits, (block.num_rows, c), "ClassLogitsBatch.logits", f"[rows={block.num_rows}, num_classes={c}]")
        for s, lab in zip(block.sample_ids, block.labels, strict=True):
            if lab is not None and not 0 <= lab < c:
                raise EncodingError(f"label of sample_id {s!r} is {lab}, outside [0, num_classes={c})")
        return {"logits": logits}

    def encode(self, block: RowBlock, enc: dict[str, Any], id_limit: int) -> dict[str, pa.Array]:
        logits = block.payload["logits"]
        bad = ~np.isfinite(logits)
        if bad.any():
            r = int(np.flatnonzero(bad.any(axis=1))[0])
            raise EncodingError(f"class logits of sample_id {block.sample_ids[r]!r} hold NaN or inf; "
                                "the teacher produced non-finite logits (check its dtype)")
        lengths = np.full(block.num_rows, logits.shape[1], np.int64)
        return {"class_logits": list_array(logits.reshape(-1), lengths, pa.float32())}

    def max_entries(self, enc: dict[str, Any], rows: int, positions: int) -> dict[str, int]:
        return {"class_logits": rows * int(enc["num_classes"])}

    def decode(self, cols: ShardColumns, enc: dict[str, Any], ctx: BatchRows) -> list[dict[str, Any]]:
        n, c = len(ctx.pos_offsets) - 1, int(enc["num_classes"])
        values, _ = cols.lists("class_logits", np.full(n, c))
        logits = values.astype(np.float32, copy=False).reshape(n, c)
        bad = ~np.isfinite(logits).all(axis=1)
        if ctx.positions.size:
            bad |= np.diff(ctx.pos_offsets) > 0
        if "label" in cols.batch.schema.names:
            labels = pc.fill_null(cols.batch.column("label"), 0).to_numpy(zero_copy_only=False)
            bad |= (labels < 0) | (labels >= c)
        if bad.any():
            raise ctx.invalid(ctx.row(int(np.flatnonzero(bad)[0])), "class logits are NaN/inf, the row has target "
                              f"positions, or its label is outside [0, num_classes={c})")
        return [{"class_logits": logits[i]} for i in range(n)]
