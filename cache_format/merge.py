"""``merge_caches()``: join independently finalized caches of one dump into one cache.

(Workers that write into one ``--out`` need no merge: the last one finalizes it, see
:mod:`cache_format.finalize`.) The output — a local folder or an object-store URL — must be new,
empty, or hold only the leftovers of an unfinished merge or copy (kdpipe temporary files
``.tmp-<32 hex>-…`` and shards named ``shard-u<9 digits>-p<4 digits>.arrow``, no manifest):
those are kdpipe's own and are removed, so a failed merge can simply be rerun. Each shard is
checked (size, sha256) before it appears under its name; the manifest is written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

from cache_format._files import atomic_write, copy_shard_verified, fsync_dir, is_leftover, refuse_overlap
from cache_format._target import WriteTarget, open_target
from cache_format.errors import CacheExistsError, DuplicateError, IncompatibleCacheError
from cache_format.manifest import MANIFEST_NAME, ShardInfo, build_manifest, dumps_manifest, printable
from cache_format.reader import CacheReader, open_cache
from cache_format.storage import is_remote


def merge_caches(out: str | os.PathLike[str], inputs: list[str | os.PathLike[str]],
                 storage_options: dict[str, Any] | None = None,
                 out_storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the inputs' shards into ``out`` and write one manifest, ordered by (unit, part).

    Refuses inputs whose identities differ (``run`` is ignored), duplicate units, shard names and
    sample ids, and an ``out`` that is (inside) an input or holds foreign files. Every shard's size
    and sha256 are checked before it appears in ``out``; on failure, nothing this call wrote is left.
    Returns the manifest dict.
    """
    if not inputs:
        raise IncompatibleCacheError("merge needs at least one input cache")
    if is_remote(out):
        out_storage_options = storage_options if out_storage_options is None else out_storage_options
    refuse_overlap("merge", out, out_storage_options, [(p, storage_options) for p in inputs])
    # Checksums are verified while the sample ids are scanned: nothing unverified is decoded.
    readers: list[CacheReader] = [open_cache(p, storage_options, verify_checksums=True) for p in inputs]
    units = _check_mergeable(inputs, readers)
    if is_remote(out):
        return _merge_remote(open_target(out, out_storage_options), inputs, readers, units)
    out_dir = Path(out)
    made_dir = _prepare_out(out_dir)
    placed: list[Path] = []
    try:
        for r in readers:
            for info in r.shard_infos:
                copy_shard_verified(r.storage, info, out_dir)
                placed.append(out_dir / info.name)
            r.close()
        fsync_dir(out_dir)
        manifest = _merged_manifest(inputs, readers, units)
        atomic_write(out_dir / MANIFEST_NAME, dumps_manifest(manifest).encode())
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    return manifest


def _merged_manifest(inputs: list[str | os.PathLike[str]], readers: list[CacheReader], units: list[int]) -> dict[str, Any]:
    merged_identity = dataclasses.replace(readers[0].identity, run={"merged_from": [
        {"path": str(p), "run": r.identity.run} for p, r in zip(inputs, readers, strict=True)]})
    shards: list[ShardInfo] = [info for r in readers for info in r.shard_infos]
    return build_manifest(merged_identity, readers[0].manifest.shard_encoding, shards, units)


def _merge_remote(target: WriteTarget, inputs: list[str | os.PathLike[str]], readers: list[CacheReader],
                  units: list[int]) -> dict[str, Any]:
    """Merge into an object-store prefix: each shard checked, then uploaded in one PUT; the manifest last."""
    entries = target.list_files()
    foreign = sorted(n for n, size in entries.items() if size is None or not is_leftover(n))
    if foreign:
        raise CacheExistsError(f"{target.describe()} is not empty: {printable(repr(foreign[0]))} is not a leftover of an "
                               "unfinished kdpipe merge or copy; merge writes a new cache — choose an empty prefix")
    for name in entries:
        target.delete(name)
    for r in readers:
        for info in r.shard_infos:
            target.put(info.name, bytes(r.storage.read_shard(info.name, info.bytes, info.sha256)))
        r.close()
    manifest = _merged_manifest(inputs, readers, units)
    target.put(MANIFEST_NAME, dumps_manifest(manifest).encode())
    return manifest


def _prepare_out(out_dir: Path) -> bool:
    """Make ``out_dir`` ready: refuse foreign content, remove an unfinished merge's leftovers; True if created."""
    if not os.path.lexists(out_dir):
        out_dir.mkdir(parents=True)
        return True
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise CacheExistsError(f"{out_dir} exists and is not a folder; merge writes a new cache — choose an empty "
                               "directory")
    with os.scandir(out_dir) as it:
        entries = list(it)
    foreign = sorted(e.name for e in entries if not e.is_file(follow_symlinks=False) or not is_leftover(e.name))
    if foreign:
        raise CacheExistsError(f"{out_dir} is not empty: {printable(repr(foreign[0]))} is not a leftover of an "
                               "unfinished kdpipe merge or copy; merge writes a new cache — choose an empty directory")
    for e in entries:
        os.unlink(e.path)
    return False


def _check_mergeable(inputs: list[str | os.PathLike[str]], readers: list[CacheReader]) -> list[int]:
    """Refuse caches of different dumps, or overlapping work; returns all units, sorted."""
    first = readers[0]
    for path, r in zip(inputs[1:], readers[1:], strict=True):
        diffs = first.identity.diff(r.identity)
        if diffs:
            raise IncompatibleCacheError(printable(
                f"cannot merge {path} with {inputs[0]}: identities differ (" + "; ".join(diffs[:10])
                + "); only workers of one dump can be merged", 2000))
        if r.manifest.shard_encoding != first.manifest.shard_encoding:
            raise IncompatibleCacheError(printable(
                f"cannot merge {path} with {inputs[0]}: shard_encoding differs "
                f"({r.manifest.shard_encoding} != {first.manifest.shard_encoding})", 2000))
    unit_owner: dict[int, str] = {}
    name_owner: dict[str, str] = {}
    for path, r in zip(inputs, readers, strict=True):
        for u in r.manifest.units:
            if u in unit_owner:
                raise DuplicateError(f"unit {u} is in both {unit_owner[u]} and {path}; the same work was done twice "
                                     "— drop one of the two caches (or merge only disjoint workers)")
            unit_owner[u] = str(path)
        for info in r.shard_infos:
            if info.name.casefold() in name_owner:
                raise DuplicateError(f"shard {info.name} is in both {name_owner[info.name.casefold()]} and {path}; "
                                     "merged shards share one folder — these caches cannot be merged")
            name_owner[info.name.casefold()] = str(path)
    seen: dict[str, str] = {}
    for path, r in zip(inputs, readers, strict=True):
        for row in r.iter_rows():
            if row.sample_id in seen:
                raise DuplicateError(f"sample_id {printable(repr(row.sample_id))} is in both {seen[row.sample_id]} "
                                     f"and {path}; the workers' units overlapped — re-dump with disjoint units")
            seen[row.sample_id] = str(path)
    return sorted(unit_owner)
