"""``CacheWriter``: atomic shards, a background encode/write thread, work units for resume.

Durability protocol (see SPEC.md, "Writing"): rows are buffered and encoded into shards
under a temporary name; ``end_unit(j)`` fsyncs and renames the unit's shards to their final
names, then appends unit j to an fsynced journal. Only journaled units count as complete, so
a restart after ``kill -9`` at any moment discards partial work and redoes exactly the
unfinished units. ``finalize()`` writes ``manifest.json`` last, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from cache_format.batches import Batch, RowBlock, check_batch
from cache_format.errors import (
    CacheError,
    CacheExistsError,
    DuplicateError,
    IncompatibleCacheError,
    ManifestError,
    WriterStateError,
)
from cache_format.identity import CacheIdentity
from cache_format.manifest import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    PROGRESS_JOURNAL,
    SHARD_NAME_RE,
    TMP_PREFIX,
    ShardInfo,
    build_manifest,
    dumps_manifest,
    parse_manifest,
    shard_name,
)
from cache_format.shard import FORMAT_NAME, FORMAT_VERSION, build_table, merge_blocks, shard_encoding
from cache_format.storage import is_remote

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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def serialize_table(table: pa.Table, compression_level: int) -> bytes:
    """The Arrow IPC file bytes of ``table`` with zstd-compressed buffers."""
    # use_threads=False: compression runs on the writer's own thread only, leaving cores to the teacher.
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=compression_level),
                                  use_threads=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=opts) as w:
        for b in table.to_batches():
            w.write_batch(b)
    return sink.getvalue().to_pybytes()


class CacheWriter:
    """Write a cache; see the module docstring and ``docs/ARCHITECTURE.md`` for the protocol."""

    def __init__(self, root: str | os.PathLike[str], identity: CacheIdentity, mode: str = "create", *,
                 max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 queue_size: int = DEFAULT_QUEUE_SIZE, compression_level: int = DEFAULT_COMPRESSION_LEVEL) -> None:
        if is_remote(root):
            raise CacheError(f"CacheWriter writes local directories only, got {root}; write locally, then "
                             "upload with `kdpipe cache copy LOCAL URL` (cache_format.copy_cache)")
        if mode not in ("create", "overwrite", "resume"):
            raise WriterStateError(f"mode must be 'create', 'overwrite' or 'resume', got {mode!r}")
        if not isinstance(identity, CacheIdentity):
            raise WriterStateError(f"identity must be a CacheIdentity, got {type(identity).__name__}")
        for name, v in (("max_shard_rows", max_shard_rows), ("max_shard_bytes", max_shard_bytes),
                        ("queue_size", queue_size)):
            if not isinstance(v, int) or v < 1:
                raise WriterStateError(f"{name} must be a positive integer, got {v!r}")
        self.root = Path(str(root)[len("file://"):] if str(root).startswith("file://") else root)
        self.identity = identity
        self.mode = mode
        self.max_shard_rows = max_shard_rows
        self.max_shard_bytes = max_shard_bytes
        self.compression_level = compression_level
        self._enc = shard_encoding(identity)
        self._lock = threading.Lock()
        self._done: dict[int, list[ShardInfo]] = {}
        self._created_at: str | None = None
        self._prepare()
        self._resumed_units = frozenset(self._done)
        self._ended: set[int] = set()
        self._sample_ids: set[str] = set()
        self._closed = False
        self._finalized = False
        self._manifest: dict[str, Any] | None = None
        self.stats: dict[str, float] = {"encode_s": 0.0, "write_s": 0.0, "blocked_s": 0.0, "rows": 0,
                                        "positions": 0, "tokens": 0, "shards": 0, "bytes": 0}
        # Background-thread state.
        self._open: list[RowBlock] = []
        self._open_rows = 0
        self._open_bytes = 0
        self._unit_parts: list[tuple[Path, ShardInfo]] = []
        self._error: BaseException | None = None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="kdpipe-cache-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API (caller thread)

    @property
    def completed_units(self) -> set[int]:
        """Units durably complete: those of earlier runs (resume) plus those recorded so far in this run."""
        with self._lock:
            return set(self._done)

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
        if self._finalized and self._manifest is not None:
            return self._manifest
        self._check_usable()
        self._put(("finalize", None))
        self._join()
        self._finalized = True
        self._raise_if_failed()
        if self._manifest is None:  # pragma: no cover - the thread sets it before exiting cleanly
            raise CacheError(f"{self.root}: finalize did not produce a manifest")
        return self._manifest

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

    # ------------------------------------------------------------ preparing the directory

    def _marker(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_at": self._created_at,
                "identity": self.identity.to_dict(), "identity_fingerprint": self.identity.fingerprint()}

    def _prepare(self) -> None:
        from cache_format.manifest import now_iso

        self._created_at = now_iso()
        root = self.root
        entries = sorted(os.listdir(root)) if root.is_dir() else []
        if root.exists() and not root.is_dir():
            raise CacheExistsError(f"{root} exists and is not a directory; choose another output path")
        if entries and self.mode == "create":
            raise CacheExistsError(f"{root} is not empty; pass mode='overwrite' (--overwrite) to replace the cache "
                                   "there, or mode='resume' (--resume) to continue an interrupted dump")
        if entries and self.mode == "overwrite":
            self._remove_previous(entries)
        elif entries and self.mode == "resume":
            self._load_previous(entries)
            return
        root.mkdir(parents=True, exist_ok=True)
        _atomic_write(root / INCOMPLETE_MARKER, json.dumps(self._marker(), indent=1).encode())
        _atomic_write(root / PROGRESS_JOURNAL, b"")

    @staticmethod
    def _ours(name: str) -> bool:
        return (name in (MANIFEST_NAME, INCOMPLETE_MARKER, PROGRESS_JOURNAL) or name.startswith(TMP_PREFIX)
                or bool(SHARD_NAME_RE.match(name)))

    def _remove_previous(self, entries: list[str]) -> None:
        foreign = [e for e in entries if not self._ours(e) or (self.root / e).is_dir()]
        if foreign:
            raise CacheExistsError(f"{self.root} holds {foreign[0]!r}, which is not part of a kdpipe cache; refusing "
                                   "to overwrite a directory with foreign files — choose an empty or cache directory")
        # Manifest first: from here on no reader takes the directory for a complete cache.
        order = sorted(entries, key=lambda e: e != MANIFEST_NAME)
        for e in order:
            (self.root / e).unlink()
        _fsync_dir(self.root)

    def _check_identity(self, stored: Any, source: Path) -> None:
        other = CacheIdentity.from_dict(stored, str(source))
        diffs = other.diff(self.identity)
        if diffs:
            raise IncompatibleCacheError(
                f"cannot resume into {self.root}: its identity ({source.name}) differs from this dump's "
                "(cache value != this run's value): " + "; ".join(diffs[:10])
                + " — use a new output directory, or --overwrite to replace it")

    def _load_previous(self, entries: list[str]) -> None:
        root = self.root
        if MANIFEST_NAME in entries:
            m = parse_manifest((root / MANIFEST_NAME).read_bytes(), str(root / MANIFEST_NAME))
            self._check_identity(m.raw["identity"], root / MANIFEST_NAME)
            self._created_at = m.created_at
            by_unit: dict[int, list[ShardInfo]] = {u: [] for u in m.units}
            for s in m.shards:
                by_unit.setdefault(s.unit, []).append(s)
            self._done = by_unit
            _atomic_write(root / INCOMPLETE_MARKER, json.dumps(self._marker(), indent=1).encode())
            self._rewrite_journal()
            (root / MANIFEST_NAME).unlink()
            _fsync_dir(root)
            return
        if INCOMPLETE_MARKER not in entries:
            raise CacheExistsError(f"{root} is not empty and holds no kdpipe cache (no {MANIFEST_NAME} or "
                                   f"{INCOMPLETE_MARKER}); choose another directory")
        try:
            marker = json.loads((root / INCOMPLETE_MARKER).read_text())
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{root / INCOMPLETE_MARKER} is unreadable ({exc}); the unfinished cache cannot be "
                                "resumed — restart with --overwrite") from None
        if not isinstance(marker, dict):
            raise ManifestError(f"{root / INCOMPLETE_MARKER} must hold a JSON object; restart with --overwrite")
        self._check_identity(marker.get("identity"), root / INCOMPLETE_MARKER)
        self._created_at = marker.get("created_at") or self._created_at
        self._done = self._read_journal()
        keep = {s.name for infos in self._done.values() for s in infos}
        for e in entries:
            if e.startswith(TMP_PREFIX) or (SHARD_NAME_RE.match(e) and e not in keep):
                (root / e).unlink()  # a shard whose unit was never journaled, or a half-written file
        self._rewrite_journal()
        _fsync_dir(root)

    def _read_journal(self) -> dict[int, list[ShardInfo]]:
        path = self.root / PROGRESS_JOURNAL
        done: dict[int, list[ShardInfo]] = {}
        if not path.exists():
            return done
        lines = path.read_bytes().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                infos = [ShardInfo(**s) for s in rec["shards"]]
                unit = int(rec["unit"])
            except (ValueError, KeyError, TypeError):
                if i >= len(lines) - 2:
                    break  # a torn final line: its unit was not recorded, so it is simply redone
                raise ManifestError(f"{path} line {i + 1} is corrupt; the unfinished cache cannot be resumed "
                                    "safely — restart with --overwrite") from None
            # A journaled shard that vanished makes its unit incomplete: redo it.
            if all((self.root / s.name).is_file() and (self.root / s.name).stat().st_size == s.bytes
                   for s in infos):
                done[unit] = infos
        return done

    def _rewrite_journal(self) -> None:
        lines = [json.dumps({"unit": u, "shards": [s.to_dict() for s in infos]}) for u, infos in
                 sorted(self._done.items())]
        _atomic_write(self.root / PROGRESS_JOURNAL, ("\n".join(lines) + "\n" if lines else "").encode())

    # ------------------------------------------------------------ background thread

    def _run(self) -> None:
        try:
            while True:
                kind, arg = self._queue.get()
                if kind == "rows":
                    self._add_rows(arg)
                elif kind == "end_unit":
                    self._end_unit(arg)
                elif kind == "finalize":
                    self._finalize()
                    return
                else:  # close
                    self._discard_open()
                    return
        except BaseException as exc:
            self._error = exc
            self._discard_open()
            while True:  # unblock producers waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break

    def _add_rows(self, block: RowBlock) -> None:
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
        table = build_table(block, self.identity)
        data = serialize_table(table, self.compression_level)
        t1 = time.perf_counter()
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}.arrow"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        info = ShardInfo(name="", rows=block.num_rows, tokens=int(sum(len(x) for x in block.input_ids)),
                         positions=block.num_positions, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                         unit=-1)
        self._unit_parts.append((tmp, info))
        self.stats["encode_s"] += t1 - t0
        self.stats["write_s"] += time.perf_counter() - t1

    def _end_unit(self, unit: int) -> None:
        self._flush_part()
        t0 = time.perf_counter()
        infos = []
        for part, (tmp, info) in enumerate(self._unit_parts):
            name = shard_name(unit, part)
            os.replace(tmp, self.root / name)
            infos.append(ShardInfo(name=name, rows=info.rows, tokens=info.tokens, positions=info.positions,
                                   bytes=info.bytes, sha256=info.sha256, unit=unit, part=part))
        self._unit_parts = []
        _fsync_dir(self.root)
        line = json.dumps({"unit": unit, "shards": [s.to_dict() for s in infos]}) + "\n"
        with open(self.root / PROGRESS_JOURNAL, "ab") as fh:
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())
        with self._lock:
            self._done[unit] = infos
        for s in infos:
            self.stats["rows"] += s.rows
            self.stats["positions"] += s.positions
            self.stats["tokens"] += s.tokens
            self.stats["bytes"] += s.bytes
            self.stats["shards"] += 1
        self.stats["write_s"] += time.perf_counter() - t0

    def _discard_open(self) -> None:
        self._open, self._open_rows, self._open_bytes = [], 0, 0
        for tmp, _ in self._unit_parts:
            tmp.unlink(missing_ok=True)
        self._unit_parts = []

    def _finalize(self) -> None:
        if self._open or self._unit_parts:
            taken = set(self._done) | self._ended
            self._end_unit(max(taken) + 1 if taken else 0)
        shards = [s for infos in self._done.values() for s in infos]
        manifest = build_manifest(self.identity, self._enc, shards, sorted(self._done), created_at=self._created_at)
        _atomic_write(self.root / MANIFEST_NAME, dumps_manifest(manifest).encode())
        (self.root / PROGRESS_JOURNAL).unlink(missing_ok=True)
        (self.root / INCOMPLETE_MARKER).unlink(missing_ok=True)
        _fsync_dir(self.root)
        self._manifest = manifest
