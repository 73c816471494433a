"""What every encoding implements (:class:`EncodingFormat`) and the Arrow column helpers they share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cache_format.errors import EncodingError, ShardCorruptError
from cache_format.rows import BatchRows, RowBlock, check_rows

if TYPE_CHECKING:
    from cache_format.identity import CacheIdentity

LIST_U8 = pa.list_(pa.uint8())
# Everything Arrow (or numpy on Arrow's output) raises on a malformed file: flipped bits surface as
# any of these, and each becomes a ShardCorruptError naming the shard, batch and column.
ARROW_ERRORS = (pa.ArrowException, OSError, ValueError, IndexError, KeyError, TypeError, OverflowError,
                MemoryError, RecursionError)


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
    """The columns of one record batch, read with the per-row length checks the spec requires."""

    batch: pa.RecordBatch
    shard: str
    first_row: int

    def _column(self, name: str) -> pa.Array:
        col = self.batch.column(name)
        if col.null_count or (hasattr(col, "values") and col.values.null_count):
            raise ShardCorruptError(f"shard {self.shard} rows from {self.first_row}: column {name} has null values; "
                                    "the spec forbids nulls there — re-dump it")
        return col

    def lists(self, name: str, expected: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(values, offsets rebased to 0) of a list column, zero-copy where possible.

        ``expected``: the entry count each row must have; a mismatch means a corrupt shard.
        """
        try:
            col = self._column(name)
            offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
            values = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        except ARROW_ERRORS as exc:
            raise self._unreadable(name, exc) from None
        offsets = offsets - offsets[0]
        got = np.diff(offsets)
        if (got < 0).any() or offsets[-1] != len(values):
            raise ShardCorruptError(f"shard {self.shard} rows from {self.first_row}: column {name} has offsets that "
                                    "go backwards or past its values; the shard is corrupt — re-dump it")
        if expected is not None and not np.array_equal(got, expected):
            r = int(np.flatnonzero(got != expected)[0])
            raise ShardCorruptError(f"shard {self.shard} row {self.first_row + r}: column {name} has "
                                    f"{int(got[r])} entries, expected {int(expected[r])}; the shard is corrupt "
                                    "— re-dump it")
        return values, offsets

    def strings(self, name: str) -> tuple[list[str], np.ndarray]:
        """The values of a string column and their UTF-8 byte lengths."""
        try:
            col = self._column(name)
            lengths = pc.binary_length(col).to_numpy(zero_copy_only=False)
            return col.to_pylist(), lengths
        except ARROW_ERRORS as exc:
            raise self._unreadable(name, exc) from None

    def planes(self, prefix: str, id_bytes: int, expected: np.ndarray) -> list[np.ndarray]:
        """The token-id byte planes written by :func:`plane_fields`."""
        return [self.lists(f"{prefix}_b{b}", expected)[0] for b in range(id_bytes)]

    def _unreadable(self, name: str, exc: BaseException) -> ShardCorruptError:
        from cache_format.manifest import printable  # here: manifest imports this package

        return ShardCorruptError(f"shard {self.shard} rows from {self.first_row}: column {name} cannot be decoded "
                                 f"({printable(f'{type(exc).__name__}: {exc}')}); re-copy the cache or re-dump it")


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
    def max_entries(self, enc: dict[str, Any], rows: int, positions: int) -> dict[str, int]:
        """Per list column, the most values a record batch of ``rows`` rows and ``positions`` positions holds."""

    @abstractmethod
    def decode(self, cols: ShardColumns, enc: dict[str, Any], ctx: BatchRows) -> list[dict[str, Any]]:
        """Per row, the ``DecodedRow`` fields this encoding fills, after checking this encoding's row rules.

        ``ctx.pos_offsets`` cut the positions into rows; a broken rule raises ``ctx.invalid(...)``
        (vectorized over the batch: the first offending position is named).
        """

    def check_batch(self, batch: Any, identity: CacheIdentity) -> RowBlock:
        """Structural checks of ``batch`` against ``identity``; returns the writer's internal form."""
        if not isinstance(batch, self.batch_type):
            raise EncodingError(f"this cache's encoding is {self.kind}; write {self.batch_type.__name__}, "
                                f"not {type(batch).__name__}")
        block = check_rows(batch, identity.id_limit or None, self.per_position)
        block.payload = self.check_payload(batch, identity.encoding, block)
        return block


def check_matrix(a: np.ndarray, shape: tuple[int, int], what: str, expected: str, integer: bool = False) -> None:
    """``a`` must have ``shape`` (``expected`` explains it) and, if ``integer``, an integer dtype when not empty."""
    if a.shape != shape:
        raise EncodingError(f"{what} has shape {a.shape}; expected {expected}")
    if integer and a.size and not np.issubdtype(a.dtype, np.integer):
        raise EncodingError(f"{what} must be integers, got dtype {a.dtype}")
