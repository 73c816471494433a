"""``open_cache()`` → ``CacheReader``: validate the manifest first, then stream shards batch by batch."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from cache_format.errors import (
    CacheNotFoundError,
    ChecksumMismatchError,
    CountMismatchError,
    DuplicateError,
)
from cache_format.identity import CacheIdentity
from cache_format.manifest import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    ShardInfo,
    parse_manifest,
    parse_marker,
)
from cache_format.rows import DecodedRow
from cache_format.shard_file import ShardFile
from cache_format.storage import Storage


def open_cache(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *,
               verify_checksums: bool = True) -> CacheReader:
    """Open a finished cache (local path, ``file://``, ``s3://``, ``gs://``, ``hf://``...).

    The manifest is size-capped, schema-checked, version-checked and path-checked before any
    shard is opened; every file is opened as SPEC §1 requires of untrusted caches (regular files
    only, never past the manifest's byte count). ``verify_checksums`` (on by default: a shared
    cache is untrusted until checked) checks each shard's sha256 as it is read (one pass), before
    any of it is decoded; turn it off only for caches you wrote yourself on local disk.
    """
    storage = Storage(path, storage_options)
    try:
        _, manifest = storage.read_manifest()
    except CacheNotFoundError:
        storage.check_reachable()  # a missing or invisible bucket is a storage error, not "no cache here"
        raise
    return CacheReader(storage, manifest, verify_checksums=verify_checksums)


def read_identity(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> CacheIdentity | None:
    """The identity of the cache in ``path`` (local folder or URL), finished or still being written.

    Read from ``manifest.json`` when the cache is complete, else from the writer's unfinished-cache
    marker (a dump in progress or interrupted). ``None`` when the folder is absent or empty. Raises
    a ``ManifestError`` when the manifest/marker is unreadable, ``CacheNotFoundError`` when the
    folder holds files but no kdpipe cache.
    """
    storage = Storage(path, storage_options)
    if storage.exists(MANIFEST_NAME):
        data = storage.read_bytes(MANIFEST_NAME, MAX_MANIFEST_BYTES)
        return parse_manifest(data, storage.describe(MANIFEST_NAME)).identity
    if storage.exists(INCOMPLETE_MARKER):
        data = storage.read_bytes(INCOMPLETE_MARKER, MAX_MANIFEST_BYTES)
        return parse_marker(data, storage.describe(INCOMPLETE_MARKER)).identity
    if storage.is_empty():
        return None
    raise CacheNotFoundError(f"{storage.url} is not empty but holds no kdpipe cache (no {MANIFEST_NAME} or "
                             f"{INCOMPLETE_MARKER}); choose an empty or new folder")


class CacheReader:
    """Read rows of a finished cache; see ``iter_rows`` and ``read_row``."""

    def __init__(self, storage: Storage, manifest: Manifest, *, verify_checksums: bool = True) -> None:
        self.storage = storage
        self.manifest = manifest
        self.verify_checksums = verify_checksums
        self._open_index: int | None = None
        self._open_shard: ShardFile | None = None
        self._open_pid = os.getpid()
        refuse_duplicate_shards(manifest.shards)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (spawned DataLoader workers): open shard handles are not carried over."""
        state = dict(self.__dict__)
        state.update(_open_index=None, _open_shard=None, _open_pid=-1)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def identity(self) -> CacheIdentity:
        return self.manifest.identity

    @property
    def shard_infos(self) -> list[ShardInfo]:
        return list(self.manifest.shards)

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    def __len__(self) -> int:
        return self.manifest.num_rows

    def shards_for_worker(self, worker: int, num_workers: int) -> list[int]:
        """Shard indices of worker ``worker`` of ``num_workers`` (round robin, disjoint, covering all)."""
        if not (isinstance(num_workers, int) and num_workers >= 1 and isinstance(worker, int)
                and 0 <= worker < num_workers):
            raise ValueError(f"need 0 <= worker < num_workers, got worker={worker}, num_workers={num_workers}")
        return list(range(worker, len(self.manifest.shards), num_workers))

    def iter_rows(self, shards: Sequence[int] | None = None) -> Iterator[DecodedRow]:
        """Decoded rows of the given shards (default: all, in manifest order), one record batch in memory at a time."""
        for batch in self.iter_batches(shards):
            yield from batch

    def iter_batches(self, shards: Sequence[int] | None = None) -> Iterator[list[DecodedRow]]:
        """Like ``iter_rows`` but yields the decoded rows of one Arrow record batch at a time.

        Every row has passed the spec's row rules (the same ones ``verify_cache`` applies); a
        row that breaks one raises ``InvariantError`` before any row of its batch is handed out,
        and a sample id repeated within a shard raises ``DuplicateError``.
        """
        indices = range(len(self.manifest.shards)) if shards is None else shards
        for i in indices:
            info = self._info(i)
            shard = self._open(i)
            rows = positions = tokens = 0
            for decoded in shard.iter_decoded(int(i)):
                rows += len(decoded)
                positions += sum(len(r.positions) for r in decoded)
                tokens += sum(len(r.input_ids) for r in decoded)
                yield decoded
            check_counts(info, rows, tokens, positions)

    def read_row(self, shard_index: int, row_index: int) -> DecodedRow:
        """Random access: decode one row (reads only the record batch that holds it)."""
        info = self._info(shard_index)
        if not isinstance(row_index, int) or not 0 <= row_index < info.rows:
            raise IndexError(f"row {row_index} is outside shard {info.name} (rows 0..{info.rows - 1})")
        shard = self._open(shard_index)
        b = int(np.searchsorted(shard.starts, row_index, side="right") - 1)
        return shard.decode(b, int(shard_index), row_index)[0]

    def close(self) -> None:
        if self._open_shard is not None:
            self._open_shard.close()
        self._open_index = self._open_shard = None

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _info(self, i: int) -> ShardInfo:
        if not isinstance(i, int | np.integer) or not 0 <= int(i) < len(self.manifest.shards):
            raise IndexError(f"shard index {i} is outside 0..{len(self.manifest.shards) - 1}")
        return self.manifest.shards[int(i)]

    def _open(self, i: int) -> ShardFile:
        i = int(i)
        if self._open_pid != os.getpid():
            # Forked (e.g. a DataLoader worker): the inherited file shares its offset with the
            # parent's, so forget it (without closing the parent's) and open our own.
            self._open_index = self._open_shard = None
            self._open_pid = os.getpid()
        if self._open_index == i and self._open_shard is not None:
            return self._open_shard
        self.close()
        info = self._info(i)
        # Regular file inside the root, exact size, and (when asked) sha256 — all before Arrow sees a byte.
        fh = self.storage.open_shard(info.name, info.bytes, info.sha256 if self.verify_checksums else None)
        try:
            shard = ShardFile(fh, info, self.manifest.shard_encoding, self.storage.describe(info.name),
                              self.identity.id_limit)
        except BaseException:
            fh.close()
            raise
        self._open_index, self._open_shard = i, shard
        return shard


def refuse_duplicate_shards(shards: Sequence[ShardInfo]) -> None:
    """Two shards with rows and one sha256 hold the same rows: a consumer would read them twice.

    (Rows repeated across shards that differ elsewhere need the whole cache read: ``verify`` finds them.)
    """
    first: dict[str, str] = {}
    for info in shards:
        if info.rows and first.setdefault(info.sha256, info.name) != info.name:
            raise DuplicateError(f"shards {first[info.sha256]} and {info.name} are byte-identical (same sha256), so "
                                 "their rows would be read twice; the cache was assembled wrongly — re-merge it from "
                                 "its parts or re-dump it")


def check_counts(info: ShardInfo, rows: int, tokens: int, positions: int) -> None:
    for what, got, want in (("rows", rows, info.rows), ("tokens", tokens, info.tokens),
                            ("positions", positions, info.positions)):
        if got != want:
            raise CountMismatchError(f"shard {info.name} holds {got} {what} but the manifest says {want}; the "
                                     "manifest or shard was altered — re-dump or re-merge the cache")


def check_sha256(info: ShardInfo, digest: str, where: str) -> None:
    if digest != info.sha256:
        raise ChecksumMismatchError(f"shard {where}: sha256 {digest[:16]}… differs from the manifest's "
                                    f"{info.sha256[:16]}…; the file changed after it was written — re-copy or "
                                    "re-dump it")
