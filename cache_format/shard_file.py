"""``ShardFile``: one open shard whose record batches are sized and type-checked before Arrow decodes them.

A shard is untrusted input (SPEC §5.1, "Reader limits"). Opening one reads the footer and
schema only; each record batch is then checked from its IPC message metadata (row count, field
node lengths, the uncompressed length of every buffer of the spec's columns) against the
manifest's counts and the format's caps, and only then handed to Arrow, which decompresses the
spec's columns alone (unknown columns cost nothing). Every failure is a ``ShardCorruptError``
naming the shard, the record batch and the column.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from cache_format import _ipc_meta as ipc
from cache_format.encodings import ENCODINGS
from cache_format.errors import CountMismatchError, DuplicateError, ShardCorruptError
from cache_format.manifest import ShardInfo, printable
from cache_format.rows import MAX_SAMPLE_ID_BYTES, DecodedRow
from cache_format.shard import (
    ARROW_ERRORS,
    BATCH_MAX_ROWS,
    MAX_BATCH_BYTES,
    META_BATCH_ROWS,
    check_schema,
    decode_batch,
    read_shard_encoding,
)

# Dictionary batches (only an unknown, optional column could have one) are read by Arrow when the
# file is opened, whichever columns are selected, so they get a small budget of their own.
MAX_DICTIONARY_BYTES = 16 * 1024 * 1024
# Slack per buffer over its exact size: other Arrow writers MAY pad buffers to 64 bytes.
_PAD = 64
_FIX = "run `kdpipe cache verify` on it, then re-copy the cache from an intact source or re-dump it"


class ShardFile:
    """An open shard: footer and schema checked, record batches read one at a time within the caps."""

    def __init__(self, fh: Any, info: ShardInfo, manifest_enc: dict[str, Any], where: str,
                 id_limit: int | None) -> None:
        self.fh, self.info, self.where, self.id_limit = fh, info, where, id_limit
        self.size = info.bytes
        try:
            schema, num_batches = _schema_of(fh)
        except ARROW_ERRORS as exc:
            raise ShardCorruptError(f"shard {where} is not a readable Arrow IPC file "
                                    f"({printable(f'{type(exc).__name__}: {exc}')}); {_FIX}") from None
        self.enc = read_shard_encoding(schema, where)
        if self.enc != manifest_enc:
            raise ShardCorruptError(f"shard {where} was written with encoding {self.enc}, but the manifest says "
                                    f"{manifest_enc}; the shard belongs to another cache — re-copy the cache or "
                                    "re-dump it")
        self.columns = check_schema(schema, self.enc, where)  # name -> field index
        self.starts = batch_starts(schema, num_batches, info)
        dicts, self.blocks = self._guard(lambda: ipc.read_footer_blocks(fh, self.size), "the footer")
        if len(self.blocks) != num_batches:
            raise self._corrupt("the footer", f"lists {len(self.blocks)} record batches, Arrow reads {num_batches}")
        self._check_dictionaries(dicts)
        self._plan = self._guard(lambda: _column_plan(schema, self.columns), "the schema")
        opts = pa.ipc.IpcReadOptions(included_fields=sorted(self.columns.values()))
        self.reader = self._guard(lambda: pa.ipc.open_file(fh, options=opts), "the file")

    @property
    def num_batches(self) -> int:
        return len(self.blocks)

    def read_batch(self, b: int) -> pa.RecordBatch:
        """Record batch ``b`` with only the spec's columns, after its sizes passed the caps."""
        rows = int(self.starts[b + 1] - self.starts[b])
        meta = self._guard(lambda: ipc.read_batch_meta(self.fh, self.blocks[b], self.size), f"record batch {b}")
        if meta.length != rows:
            raise self._corrupt(f"record batch {b}", f"holds {meta.length} rows but kdpipe.batch_rows says {rows}")
        self._check_sizes(b, meta, rows)
        batch = self._guard(lambda: self.reader.get_batch(b), f"record batch {b}")
        if batch.num_rows != rows:
            raise self._corrupt(f"record batch {b}", f"decodes to {batch.num_rows} rows, not {rows}")
        for name in batch.schema.names:
            # Full validation: offsets within bounds and increasing, sample ids valid UTF-8.
            self._guard(lambda n=name: batch.column(n).validate(full=True), f"record batch {b} column {name}")
        return batch

    def decode(self, b: int, shard_index: int, row: int | None = None) -> list[DecodedRow]:
        """Every row of record batch ``b`` (or only shard row ``row``), decoded and checked against the spec."""
        batch, first = self.read_batch(b), int(self.starts[b])
        if row is not None:
            batch, first = batch.slice(row - first, 1), row
        return decode_batch(batch, self.enc, self.info.name, shard_index, first, id_limit=self.id_limit)

    def iter_decoded(self, shard_index: int) -> Iterator[list[DecodedRow]]:
        """The decoded rows of each record batch in order; a sample id seen twice in the shard is refused.

        (Across shards, uniqueness needs the whole cache: ``verify_cache`` checks it.)
        """
        seen: dict[str, int] = {}
        for b in range(self.num_batches):
            rows = self.decode(b, shard_index)
            for r in rows:
                first = seen.setdefault(r.sample_id, r.row_index)
                if first != r.row_index:
                    raise DuplicateError(f"sample_id {printable(repr(r.sample_id), 80)} appears twice in shard {self.where} (rows {first} "
                                         f"and {r.row_index}); sample ids must be unique — re-dump the cache")
            yield rows

    def close(self) -> None:
        self.fh.close()

    # ------------------------------------------------------------ internals

    def _guard(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except ipc.IpcMetaError as exc:
            raise self._corrupt(what, str(exc)) from None
        except ARROW_ERRORS as exc:
            raise self._corrupt(what, f"cannot be read ({printable(f'{type(exc).__name__}: {exc}')})") from None

    def _corrupt(self, what: str, problem: str) -> ShardCorruptError:
        return ShardCorruptError(f"shard {self.where}, {what}: {printable(problem, 1000)}; {_FIX}")

    def _check_dictionaries(self, dicts: list[ipc.Block]) -> None:
        total = 0
        for d, block in enumerate(dicts):
            meta = self._guard(lambda blk=block: ipc.read_batch_meta(self.fh, blk, self.size, ipc.HEADER_DICTIONARY),
                               f"dictionary batch {d}")
            total += sum(self._guard(lambda i=i, m=meta: ipc.decompressed_size(self.fh, m, i, self.size),
                                     f"dictionary batch {d}") for i in range(len(meta.buffers)))
        if total > MAX_DICTIONARY_BYTES:
            raise self._corrupt("dictionary batches", f"decompress to {total} bytes, over the reader's "
                                f"{MAX_DICTIONARY_BYTES}-byte cap (SPEC §5.1)")

    def _check_sizes(self, b: int, meta: ipc.BatchMeta, rows: int) -> None:
        """Node lengths and uncompressed buffer sizes of the spec's columns, before anything is decompressed."""
        plans = self._plan.values()
        if (len(meta.nodes) < max(p.node + p.nodes for p in plans)
                or len(meta.buffers) < max(p.buffer + p.buffers for p in plans)):
            raise self._corrupt(f"record batch {b}", "has fewer field nodes/buffers than its schema needs")
        positions = meta.nodes[self._plan["positions"].node + 1][0]  # the list's values node
        caps = {"input_ids": self.info.tokens, "positions": self.info.positions,
                **ENCODINGS[self.enc["kind"]].max_entries(self.enc, rows, positions)}
        total = 0
        for name, plan in self._plan.items():
            where = f"record batch {b} column {name}"
            lengths = [n for n, _ in meta.nodes[plan.node:plan.node + plan.nodes]]
            nulls = [z for _, z in meta.nodes[plan.node:plan.node + plan.nodes]]
            if lengths[0] != rows or (name != "label" and any(nulls)):
                raise self._corrupt(where, f"has {lengths[0]} rows (expected {rows}) or null values")
            if plan.nodes > 1 and lengths[1] > caps[name]:
                what = {"input_ids": "tokens", "positions": "positions"}.get(name, "entries")
                raise CountMismatchError(f"shard {self.where}, {where}: holds {lengths[1]} {what} but the manifest "
                                         f"says {caps[name]} (or its counts allow no more); the manifest or shard was "
                                         "altered — re-copy the cache from an intact source or re-dump it")
            for i, limit in enumerate(plan.limits(lengths)):
                got = self._guard(lambda j=plan.buffer + i: ipc.decompressed_size(self.fh, meta, j, self.size), where)
                if got > limit + _PAD:
                    raise self._corrupt(where, f"buffer {i} decompresses to {got} bytes, but its {lengths} "
                                               f"entries need at most {limit}")
                total += got
        if total > MAX_BATCH_BYTES:
            raise self._corrupt(f"record batch {b}", f"decompresses to {total} bytes, over the reader's "
                                                     f"{MAX_BATCH_BYTES}-byte cap per record batch (SPEC §5.1)")


def _schema_of(fh: Any) -> tuple[pa.Schema, int]:
    reader = pa.ipc.open_file(fh)
    return reader.schema, reader.num_record_batches


class _ColumnPlan(NamedTuple):
    """Where a spec column's field nodes and buffers sit in a record batch message, and their size limits."""

    node: int
    nodes: int
    buffer: int
    buffers: int
    limits: Callable[[list[int]], list[int]]  # node lengths -> largest legitimate size of each buffer


def _column_plan(schema: pa.Schema, columns: dict[str, int]) -> dict[str, _ColumnPlan]:
    """The :class:`_ColumnPlan` of each spec column (``columns``: name -> field index).

    Field nodes and buffers are laid out in schema order (pre-order), so the columns before a
    spec column must be stepped over, whatever their type.
    """
    starts, node, buf = [], 0, 0
    last = max(columns.values())
    for f in schema:
        starts.append((node, buf))
        if len(starts) > last + 1:
            break
        counts = ipc.layout(f.type)
        if counts is None:
            raise ipc.IpcMetaError(f"column {f.name!r} has type {f.type}, which this reader cannot step over; "
                                   "put columns of view types after the spec's columns")
        node, buf = node + counts[0], buf + counts[1]
    plan = {}
    for name, index in columns.items():
        t = schema.field(index).type
        nodes, buffers = ipc.layout(t)  # type: ignore[misc]  # spec types always have a layout
        node, buffer = starts[index]
        plan[name] = _ColumnPlan(node, nodes, buffer, buffers, _buffer_limits(t))
    return plan


def _bitmap(n: int) -> int:
    return (n + 7) // 8


def _buffer_limits(t: pa.DataType) -> Callable[[list[int]], list[int]]:
    """Largest legitimate size of each buffer of a spec column of type ``t``, from its node lengths."""
    if pa.types.is_string(t):
        return lambda n: [_bitmap(n[0]), 4 * (n[0] + 1), n[0] * MAX_SAMPLE_ID_BYTES]
    if pa.types.is_list(t):
        width = t.value_type.bit_width // 8
        return lambda n: [_bitmap(n[0]), 4 * (n[0] + 1), _bitmap(n[1]), n[1] * width]
    return lambda n: [_bitmap(n[0]), n[0] * (t.bit_width // 8)]


def batch_starts(schema: pa.Schema, num_batches: int, info: ShardInfo) -> np.ndarray:
    """First row of each record batch (plus the total), from the shard's ``kdpipe.batch_rows`` metadata."""
    raw = (schema.metadata or {}).get(META_BATCH_ROWS)
    try:
        counts = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        counts = None
    if not isinstance(counts, list) or len(counts) != num_batches or not all(
            type(c) is int and 0 <= c <= BATCH_MAX_ROWS for c in counts):
        raise ShardCorruptError(f"shard {info.name}: schema metadata kdpipe.batch_rows is missing, does not match "
                                f"its {num_batches} record batches, or has a batch over {BATCH_MAX_ROWS} rows "
                                "(SPEC §5.1); the shard is corrupt — re-dump it")
    if sum(counts) != info.rows:
        raise CountMismatchError(f"shard {info.name} holds {sum(counts)} rows but the manifest says {info.rows}; the "
                                 "manifest or shard was altered — re-create the manifest with `kdpipe cache merge` "
                                 "or re-dump")
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
