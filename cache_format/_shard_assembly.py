"""The writer's background side: rows buffered into shards, encoded, written under temporary names, published per unit.

Runs on the writer's thread only. ``end_unit`` fsyncs and renames the unit's shards to their
final names, then appends the unit to the fsynced journal; ``finalize`` writes the manifest last.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pyarrow as pa

from cache_format._cache_dir import DoneUnits, append_journal
from cache_format._files import atomic_write, fsync_dir, temp_name, write_synced
from cache_format.encodings.idset import DEFAULT_ID_CODING, ID_CODINGS
from cache_format.errors import IncompatibleCacheError, WriterStateError
from cache_format.identity import CacheIdentity
from cache_format.manifest import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    PROGRESS_JOURNAL,
    SHARD_NAME_RE,
    ShardInfo,
    build_manifest,
    dumps_manifest,
    shard_name,
)
from cache_format.rows import RowBlock
from cache_format.shard import build_table, merge_blocks, read_shard_encoding, serialize_table, shard_encoding


class ShardAssembler:
    """Cuts the written rows into shards of at most ``max_shard_rows`` rows / ``max_shard_bytes`` raw bytes."""

    def __init__(self, root: Path, identity: CacheIdentity, done: DoneUnits, created_at: str, *,
                 max_shard_rows: int, max_shard_bytes: int, compression_level: int, id_coding: str) -> None:
        self.root = root
        self.identity = identity
        self.created_at = created_at
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
        self._unit_parts: list[tuple[Path, ShardInfo]] = []  # this unit's shards, still under temporary names

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
        tmp = self.root / temp_name("shard.arrow")
        write_synced(tmp, data)
        info = ShardInfo(name="", rows=block.num_rows, tokens=int(sum(len(x) for x in block.input_ids)),
                         positions=block.num_positions, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                         unit=-1)
        self._unit_parts.append((tmp, info))
        self.stats["encode_s"] += t1 - t0
        self.stats["write_s"] += time.perf_counter() - t1

    def end_unit(self, unit: int) -> None:
        """Publish the unit's shards under their final names, then journal the unit (the commit point)."""
        self._flush_part()
        t0 = time.perf_counter()
        infos = []
        for part, (tmp, info) in enumerate(self._unit_parts):
            name = shard_name(unit, part)
            os.replace(tmp, self.root / name)
            infos.append(ShardInfo(name=name, rows=info.rows, tokens=info.tokens, positions=info.positions,
                                   bytes=info.bytes, sha256=info.sha256, unit=unit, part=part))
        self._unit_parts = []
        fsync_dir(self.root)
        append_journal(self.root, unit, infos)
        with self._done_lock:
            self._done[unit] = infos
        for s in infos:
            for key in ("rows", "positions", "tokens", "bytes"):
                self.stats[key] += getattr(s, key)
            self.stats["shards"] += 1
        self.stats["write_s"] += time.perf_counter() - t0

    def discard_open(self) -> None:
        """Drop rows not yet part of a journaled unit, and their temporary files."""
        self._open, self._open_rows, self._open_bytes = [], 0, 0
        for tmp, _ in self._unit_parts:
            tmp.unlink(missing_ok=True)
        self._unit_parts = []

    def finalize(self) -> None:
        """Rows after the last unit become one more unit; then the manifest is written and the markers removed."""
        if self._open or self._unit_parts:
            # Every ended unit is in _done by now: the queue delivers end_unit before finalize.
            self.end_unit(max(self._done) + 1 if self._done else 0)
        shards = [s for infos in self._done.values() for s in infos]
        manifest = build_manifest(self.identity, self.enc, shards, sorted(self._done),
                                  created_at=self.created_at)
        atomic_write(self.root / MANIFEST_NAME, dumps_manifest(manifest).encode())
        (self.root / PROGRESS_JOURNAL).unlink(missing_ok=True)
        (self.root / INCOMPLETE_MARKER).unlink(missing_ok=True)
        fsync_dir(self.root)
        self.manifest = manifest


def resolve_id_coding(requested: str | None, root: Path, mode: str) -> str:
    """The writer's ``topk`` id coding; a resumed cache keeps the one its shards use, so shards never mix.

    Runs before the cache folder is touched, so a refusal leaves it as it was.
    """
    if requested is not None and requested not in ID_CODINGS:
        raise WriterStateError(f"id_coding must be one of {', '.join(repr(c) for c in ID_CODINGS)}, got {requested!r}")
    names = sorted(e for e in os.listdir(root) if SHARD_NAME_RE.match(e)) if mode == "resume" and root.is_dir() else []
    if not names:
        return requested or DEFAULT_ID_CODING
    try:
        with pa.ipc.open_file(str(root / names[0])) as reader:  # the footer only: cheap
            schema = reader.schema
    except (pa.ArrowException, OSError):
        return requested or DEFAULT_ID_CODING  # a damaged shard: resuming deletes or reports it
    stored = str(read_shard_encoding(schema, names[0]).get("id_coding", "planes"))
    if requested is not None and requested != stored:
        raise IncompatibleCacheError(f"cannot resume into {root} with id_coding={requested!r}: its shards use "
                                     f"{stored!r}; resume with id_coding={stored!r} (or None), or overwrite the cache")
    return stored
