"""What every encoding implements (:class:`EncodingFormat`) and the Arrow column helpers they share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from cache_format.errors import EncodingError, InvariantError, ShardCorruptError
from cache_format.rows import DecodedRow, RowBlock, check_rows

if TYPE_CHECKING:
    from cache_format.identity import CacheIdentity

LIST_U8 = pa.list_(pa.uint8())


def check_temperature(t: Any, where: str) -> None:
    if not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise EncodingError(f"{where}.temperature must be a positive finite number, got {t!r}")


def list_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list column of ``len(lengths)`` rows holding ``values`` cut into pieces of ``lengths``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def plane_fields(prefix: str, id_bytes: int) -> list[pa.Field]:
    """The ``<prefix>_b0..`` uint8 planes of little-endian token ids."""
    return [pa.field(f"{prefix}_b{b}", LIST_U8, nullable=False) for b in range(id_bytes)]


@dataclass
class ShardColumns:
    """The list columns of one record batch, read with the per-row length checks the spec requires."""

    batch: pa.RecordBatch
    shard: str
    first_row: int

    def lists(self, name: str, expected: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(values, offsets rebased to 0) of a list column, zero-copy where possible.

        ``expected``: the entry count each row must have; a mismatch means a corrupt shard.
        """
        col = self.batch.column(name)
        if col.null_count:
            raise ShardCorruptError(f"shard {self.shard}: column {name} has null rows; the spec forbids nulls there")
        offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        values = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        offsets = offsets - offsets[0]
        if expected is not None:
            got = np.diff(offsets)
            if not np.array_equal(got, expected):
                r = int(np.flatnonzero(got != expected)[0])
                raise ShardCorruptError(f"shard {self.shard} row {self.first_row + r}: column {name} has "
                                        f"{int(got[r])} entries, expected {int(expected[r])}; the shard is corrupt "
                                        "— re-dump it")
        return values, offsets

    def planes(self, prefix: str, id_bytes: int, expected: np.ndarray) -> list[np.ndarray]:
        """The token-id byte planes written by :func:`plane_fields`."""
        return [self.lists(f"{prefix}_b{b}", expected)[0] for b in range(id_bytes)]


class EncodingFormat(ABC):
    """One encoding kind: its identity parameters, batch type, Arrow columns, encode, decode and row checks.

    Instances are stateless; the table in ``cache_format.encodings`` maps ``kind`` to one. ``enc``
    below is the shard encoding dict (the parameters plus ``id_bytes``), as stored in each shard.
    """

    kind: ClassVar[str]
    params: ClassVar[type]  # the frozen dataclass a CacheIdentity carries as ``encoding``
    batch_type: ClassVar[type]  # what CacheWriter.write() accepts
    # True: a distribution over token ids at each target position (ids are checked against the vocab
    # and stored as byte planes). False: one vector per row, no positions.
    per_position: ClassVar[bool] = True

    @abstractmethod
    def fields(self, enc: dict[str, Any]) -> list[pa.Field]:
        """This encoding's Arrow fields, in schema order after the common columns."""

    @abstractmethod
    def check_payload(self, batch: Any, encoding: Any, block: RowBlock) -> dict[str, np.ndarray]:
        """Shape/dtype checks of the batch's encoding-specific arrays; returns them as the block's payload."""

    @abstractmethod
    def encode(self, block: RowBlock, enc: dict[str, Any], id_limit: int) -> dict[str, pa.Array]:
        """This encoding's columns for ``block`` (numeric checks happen here, in the writer's thread)."""

    @abstractmethod
    def decode(self, cols: ShardColumns, enc: dict[str, Any], pos_offsets: np.ndarray) -> list[dict[str, Any]]:
        """Per row, the ``DecodedRow`` fields this encoding fills; ``pos_offsets`` cut positions into rows."""

    @abstractmethod
    def check_row(self, row: DecodedRow, encoding: Any, id_limit: int, where: str) -> None:
        """Raise InvariantError naming ``where`` when a decoded row breaks this encoding's invariants."""

    def check_batch(self, batch: Any, identity: CacheIdentity) -> RowBlock:
        """Structural checks of ``batch`` against ``identity``; returns the writer's internal form."""
        if not isinstance(batch, self.batch_type):
            raise EncodingError(f"this cache's encoding is {self.kind}; write {self.batch_type.__name__}, "
                                f"not {type(batch).__name__}")
        block = check_rows(batch, identity.id_limit or None, self.per_position)
        block.payload = self.check_payload(batch, identity.encoding, block)
        return block


def check_token_row(row: DecodedRow, id_limit: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Invariants shared by the per-position encodings; returns (ids, logprobs, tail)."""
    ids, lp, tail = row.ids, row.logprobs, row.tail
    if ids is None or lp is None or tail is None:
        raise InvariantError(f"{where}: ids/logprobs/tail missing")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= id_limit):
        raise InvariantError(f"{where}: a token id is outside [0, {id_limit})")
    if not np.isfinite(tail).all() or (tail < 0).any() or (tail > 1).any():
        raise InvariantError(f"{where}: tail mass outside [0, 1]")
    return ids, lp, tail


def check_matrix(a: np.ndarray, shape: tuple[int, int], what: str, expected: str, integer: bool = False) -> None:
    """``a`` must have ``shape`` (``expected`` explains it) and, if ``integer``, an integer dtype when not empty."""
    if a.shape != shape:
        raise EncodingError(f"{what} has shape {a.shape}; expected {expected}")
    if integer and a.size and not np.issubdtype(a.dtype, np.integer):
        raise EncodingError(f"{what} must be integers, got dtype {a.dtype}")
