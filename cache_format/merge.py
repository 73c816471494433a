"""``merge_caches()``: join the caches of independent workers of one dump into one cache."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from cache_format._files import atomic_write, copy_hashing, fsync_dir, temp_name
from cache_format.errors import CacheExistsError, DuplicateError, IncompatibleCacheError
from cache_format.manifest import MANIFEST_NAME, ShardInfo, build_manifest, dumps_manifest
from cache_format.reader import CacheReader, check_sha256, open_cache


def merge_caches(out: str | os.PathLike[str], inputs: list[str | os.PathLike[str]],
                 storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the inputs' shards into ``out`` and write one manifest, ordered by (unit, part).

    Refuses inputs whose identities differ (``run`` is ignored), duplicate units and
    duplicate sample ids. ``out`` must not exist or be empty. Returns the manifest dict.
    """
    if not inputs:
        raise IncompatibleCacheError("merge needs at least one input cache")
    readers: list[CacheReader] = [open_cache(p, storage_options) for p in inputs]
    units = _check_mergeable(inputs, readers)
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CacheExistsError(f"{out_dir} is not empty; merge writes a new cache — choose an empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = [info for r in readers for info in _copy_shards(r, out_dir)]
    fsync_dir(out_dir)
    identity = readers[0].identity
    merged_identity = dataclasses.replace(identity, run={"merged_from": [
        {"path": str(p), "run": r.identity.run} for p, r in zip(inputs, readers, strict=True)]})
    manifest = build_manifest(merged_identity, readers[0].manifest.shard_encoding, shards, units)
    atomic_write(out_dir / MANIFEST_NAME, dumps_manifest(manifest).encode())
    return manifest


def _check_mergeable(inputs: list[str | os.PathLike[str]], readers: list[CacheReader]) -> list[int]:
    """Refuse caches of different dumps, or overlapping work; returns all units, sorted."""
    first = readers[0]
    for path, r in zip(inputs[1:], readers[1:], strict=True):
        diffs = first.identity.diff(r.identity)
        if diffs:
            raise IncompatibleCacheError(f"cannot merge {path} with {inputs[0]}: identities differ ("
                                         + "; ".join(diffs[:10]) + "); only workers of one dump can be merged")
        if r.manifest.shard_encoding != first.manifest.shard_encoding:
            raise IncompatibleCacheError(f"cannot merge {path} with {inputs[0]}: shard_encoding differs "
                                         f"({r.manifest.shard_encoding} != {first.manifest.shard_encoding})")
    unit_owner: dict[int, str] = {}
    for path, r in zip(inputs, readers, strict=True):
        for u in r.manifest.units:
            if u in unit_owner:
                raise DuplicateError(f"unit {u} is in both {unit_owner[u]} and {path}; the same work was done twice "
                                     "— drop one of the two caches (or merge only disjoint workers)")
            unit_owner[u] = str(path)
    seen: dict[str, str] = {}
    for path, r in zip(inputs, readers, strict=True):
        for row in r.iter_rows():
            if row.sample_id in seen:
                raise DuplicateError(f"sample_id {row.sample_id!r} is in both {seen[row.sample_id]} and {path}; "
                                     "the workers' units overlapped — re-dump with disjoint units")
            seen[row.sample_id] = str(path)
    return sorted(unit_owner)


def _copy_shards(reader: CacheReader, out_dir: Path) -> list[ShardInfo]:
    """Copy every shard of ``reader`` into ``out_dir`` (checking its sha256 on the way), each renamed when complete."""
    for info in reader.shard_infos:
        tmp = out_dir / temp_name(info.name)
        with reader.storage.open(info.name) as src, open(tmp, "wb") as dst:
            digest = copy_hashing(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        check_sha256(info, digest, reader.storage.describe(info.name))
        os.replace(tmp, out_dir / info.name)
    reader.close()
    return reader.shard_infos
