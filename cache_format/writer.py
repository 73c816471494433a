"""``CacheWriter``: atomic shards, a background encode/write thread, work units for resume.

Durability protocol (see SPEC.md, "Writing"): rows are buffered and encoded into shards
staged under no final name (a temporary file, or memory for an object store); ``end_unit(j)``
gives the unit's shards their final names (rename, or one PUT each), then writes unit j's
marker ``.kdpipe-unit-<j>.json``. Only units with a marker count as complete, so a restart
after ``kill -9`` at any moment redoes exactly the unfinished units. ``finalize()`` writes
``manifest.json`` last, atomically (:mod:`cache_format.finalize`).

The root is a local folder or any fsspec URL (``s3://bucket/prefix``...). Several writers may
share one root (``mode="shared"``), each ending disjoint units; one of them, or
``kdpipe cache finalize``, writes the manifest once all units are there.

This module is the caller's side and the queue; the root (create/overwrite/resume/shared,
markers) is prepared by ``_cache_dir.py`` and the background thread's work is ``_shard_assembly.py``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

from cache_format._cache_dir import MODES, prepare_cache_dir
from cache_format._shard_assembly import ShardAssembler, resolve_id_coding
from cache_format._target import open_target
from cache_format.encodings import Batch, check_batch
from cache_format.errors import CacheError, DuplicateError, WriterStateError
from cache_format.identity import CacheIdentity

# Defaults. Rows: enough per shard that loader workers get few, large files; bytes: the raw
# (unencoded) data buffered for one shard, which bounds the writer's memory at ~2x this.
DEFAULT_MAX_SHARD_ROWS = 50_000
DEFAULT_MAX_SHARD_BYTES = 256 * 1024 * 1024
# Batches waiting for the background thread: absorbs jitter between teacher and encoder
# while bounding memory to a few batches.
DEFAULT_QUEUE_SIZE = 8
# zstd level 3 (zstd's default). Measured on one core at k=64 (serialize only): level 9 is 21%
# smaller on the repetitive wikitext teacher and 1% on the synthetic 150k case, but 5x slower
# (160k vs 790k tokens/s), which would break the 300k tokens/s encode target.
DEFAULT_COMPRESSION_LEVEL = 3
# How often a caller blocked on a full queue re-checks whether the background thread died.
_POLL_S = 0.2


class CacheWriter:
    """Write a cache; see the module docstring and ``docs/ARCHITECTURE.md`` for the protocol."""

    def __init__(self, root: str | os.PathLike[str], identity: CacheIdentity, mode: str = "create", *,
                 max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 queue_size: int = DEFAULT_QUEUE_SIZE, compression_level: int = DEFAULT_COMPRESSION_LEVEL,
                 id_coding: str | None = None, storage_options: dict[str, Any] | None = None) -> None:
        """``root``: a local folder or a URL (``s3://bucket/prefix``, any fsspec URL; ``storage_options`` as
        for :func:`cache_format.open_cache`). ``mode``: ``create`` (empty root), ``overwrite`` (replace a
        kdpipe cache), ``resume`` (continue one), ``shared`` (one of several workers: create or join).
        ``id_coding`` (``topk`` only): ``"set"`` (format 1.1, the default for a new cache) or ``"planes"``
        (format 1.0); ``None`` also means: on resume, whatever the cache's shards already use."""
        if mode not in MODES:
            raise WriterStateError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
        if not isinstance(identity, CacheIdentity):
            raise WriterStateError(f"identity must be a CacheIdentity, got {type(identity).__name__}")
        for name, v in (("max_shard_rows", max_shard_rows), ("max_shard_bytes", max_shard_bytes),
                        ("queue_size", queue_size)):
            if not isinstance(v, int) or v < 1:
                raise WriterStateError(f"{name} must be a positive integer, got {v!r}")
        self._target = open_target(root, storage_options)
        self.root = self._target.describe()
        self.identity = identity
        self.mode = mode
        id_coding = resolve_id_coding(id_coding, self._target, mode)
        done = prepare_cache_dir(self._target, identity, mode)
        self._resumed_units = frozenset(done)
        self._assembler = ShardAssembler(self._target, identity, done, max_shard_rows=max_shard_rows,
                                         max_shard_bytes=max_shard_bytes, compression_level=compression_level,
                                         id_coding=id_coding)
        # Shared with the background thread, which adds the encode/write times and counts.
        self.stats = self._assembler.stats
        self._ended: set[int] = set()
        self._sample_ids: set[str] = set()
        self._closed = False
        self._finalized = False
        self._error: BaseException | None = None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="kdpipe-cache-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API (caller thread)

    @property
    def completed_units(self) -> set[int]:
        """Units durably complete: those of earlier runs (resume) plus those recorded so far in this run."""
        return self._assembler.completed_units

    def write(self, batch: Batch) -> None:
        """Queue rows for encoding; checks shapes/ids here, numeric validity in the background thread."""
        self._check_usable()
        block = check_batch(batch, self.identity)
        for sid in block.sample_ids:
            if sid in self._sample_ids:
                raise DuplicateError(f"sample_id {sid!r} was already written in this unit; sample ids must be "
                                     "unique in a cache")
        self._sample_ids.update(block.sample_ids)
        self._put(("rows", block))

    def end_unit(self, unit: int) -> None:
        """All rows written since the previous ``end_unit`` form ``unit``; it is flushed and journaled in order."""
        self._check_usable()
        if not isinstance(unit, int) or isinstance(unit, bool) or unit < 0:
            raise WriterStateError(f"unit must be a non-negative integer, got {unit!r}")
        if unit in self._resumed_units:
            raise WriterStateError(f"unit {unit} was completed by an earlier run of {self.root} (it is in "
                                   "writer.completed_units); skip it instead of writing it again")
        if unit in self._ended:
            raise WriterStateError(f"unit {unit} was already ended in this run; each unit is ended once")
        self._ended.add(unit)
        # Only the current unit's ids are kept (memory stays bounded by the unit size); units are
        # disjoint slices of a dataset, and verify/merge check uniqueness across the whole cache.
        self._sample_ids.clear()
        self._put(("end_unit", unit))

    def finalize(self) -> dict[str, Any]:
        """Flush everything, write ``manifest.json`` atomically, remove the unfinished-cache marker.

        Rows written after the last ``end_unit`` become one more unit, numbered one past the
        highest unit seen. Returns the manifest as a dict.
        """
        if self._finalized and self._assembler.manifest is not None:
            return self._assembler.manifest
        self._check_usable()
        self._put(("finalize", None))
        self._join()
        self._finalized = True
        self._raise_if_failed()
        if self._assembler.manifest is None:  # pragma: no cover - the thread sets it before exiting cleanly
            raise CacheError(f"{self.root}: finalize did not produce a manifest")
        return self._assembler.manifest

    def commit(self) -> None:
        """Wait until every ended unit is committed (shards + marker), then stop; no manifest is written.

        For one of several workers sharing a root: the manifest comes from
        :func:`cache_format.finalize.finalize_cache` once all workers' units are there.
        """
        self._check_usable()
        self.close()
        self._raise_if_failed()

    def close(self) -> None:
        """Stop the background thread; queued units are still recorded, unit-less rows are discarded."""
        if self._closed:
            return
        if self._thread.is_alive() and self._error is None:
            self._put(("close", None), check=False)
        self._join()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()
        if exc_type is None:
            self._raise_if_failed()

    # ------------------------------------------------------------ caller-side helpers

    def _check_usable(self) -> None:
        self._raise_if_failed()
        if self._finalized or self._closed:
            raise WriterStateError(f"the writer of {self.root} is already {'finalized' if self._finalized else 'closed'}; "
                                   "open a new CacheWriter(mode='resume') to add data")

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, CacheError):
                raise type(err)(str(err)) from err
            raise CacheError(f"the background writer of {self.root} failed: {err!r}") from err

    def _put(self, item: tuple[str, Any], check: bool = True) -> None:
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    return
                except queue.Full:
                    if not self._thread.is_alive():
                        if check:
                            self._raise_if_failed()
                        return
        finally:
            self.stats["blocked_s"] += time.perf_counter() - t0

    def _join(self) -> None:
        self._thread.join()
        self._closed = True

    # ------------------------------------------------------------ background thread

    def _run(self) -> None:
        try:
            while True:
                kind, arg = self._queue.get()
                if kind == "rows":
                    self._assembler.add_rows(arg)
                elif kind == "end_unit":
                    self._assembler.end_unit(arg)
                elif kind == "finalize":
                    self._assembler.finalize()
                    return
                else:  # close
                    self._assembler.discard_open()
                    return
        except BaseException as exc:
            self._error = exc
            self._assembler.discard_open()
            while True:  # unblock producers waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
