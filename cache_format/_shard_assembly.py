"""The writer's background side: rows buffered into shards, encoded, staged, published per unit.

Runs on the writer's thread only. ``end_unit`` gives the unit's shards their final names (local:
rename of fsynced temporary files; object store: one PUT each), then writes the unit's marker, the
commit point; ``finalize`` (:mod:`cache_format.finalize`) writes the manifest last.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import pyarrow as pa

from cache_format._cache_dir import DoneUnits, UnitRecord, write_unit_marker
from cache_format._files import WRITER_SHARD_RE
from cache_format._target import WriteTarget
from cache_format.encodings.idset import DEFAULT_ID_CODING, ID_CODINGS
from cache_format.errors import CacheError, IncompatibleCacheError, WriterStateError
from cache_format.identity import CacheIdentity
from cache_format.manifest import ShardInfo, shard_name
from cache_format.rows import RowBlock
from cache_format.shard import build_table, merge_blocks, read_shard_encoding, serialize_table, shard_encoding


class ShardAssembler:
    """Cuts the written rows into shards of at most ``max_shard_rows`` rows / ``max_shard_bytes`` raw bytes."""

    def __init__(self, target: WriteTarget, identity: CacheIdentity, done: DoneUnits, *,
                 max_shard_rows: int, max_shard_bytes: int, compression_level: int, id_coding: str) -> None:
        self.target = target
        self.identity = identity
        self.max_shard_rows = max_shard_rows
        self.max_shard_bytes = max_shard_bytes
        self.compression_level = compression_level
        self.enc = shard_encoding(identity, id_coding)
        self.stats: dict[str, float] = {"encode_s": 0.0, "write_s": 0.0, "blocked_s": 0.0, "rows": 0,
                                        "positions": 0, "tokens": 0, "shards": 0, "bytes": 0}
        self.manifest: dict[str, object] | None = None
        self._done = done
        self._done_lock = threading.Lock()  # the caller thread reads completed_units while we add to it
        self._open: list[RowBlock] = []
        self._open_rows = 0
        self._open_bytes = 0
        self._unit_parts: list[tuple[Any, ShardInfo]] = []  # this unit's shards, staged under no final name yet

    @property
    def completed_units(self) -> set[int]:
        with self._done_lock:
            return set(self._done)

    def add_rows(self, block: RowBlock) -> None:
        self._open.append(block)
        self._open_rows += block.num_rows
        self._open_bytes += block.nbytes()
        if self._open_rows >= self.max_shard_rows or self._open_bytes >= self.max_shard_bytes:
            self._flush_part()

    def _flush_part(self) -> None:
        if not self._open:
            return
        block = merge_blocks(self._open)
        self._open, self._open_rows, self._open_bytes = [], 0, 0
        t0 = time.perf_counter()
        data = serialize_table(build_table(block, self.identity, self.enc), self.compression_level)
        t1 = time.perf_counter()
        tmp = self.target.stage("shard.arrow", data)
        info = ShardInfo(name="", rows=block.num_rows, tokens=int(sum(len(x) for x in block.input_ids)),
                         positions=block.num_positions, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                         unit=-1)
        self._unit_parts.append((tmp, info))
        self.stats["encode_s"] += t1 - t0
        self.stats["write_s"] += time.perf_counter() - t1

    def end_unit(self, unit: int) -> None:
        """Publish the unit's shards under their final names, then write the unit's marker (the commit point)."""
        self._flush_part()
        t0 = time.perf_counter()
        infos = []
        for part, (tmp, info) in enumerate(self._unit_parts):
            name = shard_name(unit, part)
            self.target.commit(tmp, name)
            infos.append(ShardInfo(name=name, rows=info.rows, tokens=info.tokens, positions=info.positions,
                                   bytes=info.bytes, sha256=info.sha256, unit=unit, part=part))
        self._unit_parts = []
        self.target.sync()
        rec = UnitRecord(infos, self.enc)
        write_unit_marker(self.target, unit, rec)
        with self._done_lock:
            self._done[unit] = rec
        for s in infos:
            for key in ("rows", "positions", "tokens", "bytes"):
                self.stats[key] += getattr(s, key)
            self.stats["shards"] += 1
        self.stats["write_s"] += time.perf_counter() - t0

    def discard_open(self) -> None:
        """Drop rows not yet part of a completed unit, and their staged shards."""
        self._open, self._open_rows, self._open_bytes = [], 0, 0
        for tmp, _ in self._unit_parts:
            self.target.discard(tmp)
        self._unit_parts = []

    def finalize(self) -> None:
        """Rows after the last unit become one more unit; then the manifest is written and the markers removed."""
        from cache_format.finalize import finalize_target

        if self._open or self._unit_parts:
            # Every ended unit is in _done by now: the queue delivers end_unit before finalize.
            self.end_unit(max(self._done) + 1 if self._done else 0)
        self.manifest = finalize_target(self.target)


def resolve_id_coding(requested: str | None, target: WriteTarget, mode: str) -> str:
    """The writer's ``topk`` id coding; a resumed cache keeps the one its shards use, so shards never mix.

    Runs before the cache folder is touched, so a refusal leaves it as it was.
    """
    if requested is not None and requested not in ID_CODINGS:
        raise WriterStateError(f"id_coding must be one of {', '.join(repr(c) for c in ID_CODINGS)}, got {requested!r}")
    names = sorted(e for e, size in target.list_files().items() if size and WRITER_SHARD_RE.fullmatch(e)) \
        if mode in ("resume", "shared") else []
    if not names:
        return requested or DEFAULT_ID_CODING
    stored = stored_id_coding(target, names[0])
    if stored is None:
        return requested or DEFAULT_ID_CODING  # a damaged shard: its unit is redone, finalize removes it
    if requested is not None and requested != stored:
        raise IncompatibleCacheError(f"cannot resume into {target.describe()} with id_coding={requested!r}: its shards use "
                                     f"{stored!r}; resume with id_coding={stored!r} (or None), or overwrite the cache")
    return stored


def stored_id_coding(target: WriteTarget, name: str) -> str | None:
    """The id coding shard ``name`` was written with (its footer only: cheap); None when it is unreadable."""
    try:
        with target.storage.open(name) as fh, pa.ipc.open_file(fh) as reader:
            schema = reader.schema
    except (pa.ArrowException, OSError, CacheError):
        return None
    return str(read_shard_encoding(schema, name).get("id_coding", "planes"))
