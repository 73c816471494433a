"""``copy_cache()``: upload a finished cache to an object store (or download one), manifest last.

Shards are copied and their sha256 checked on the way; the manifest is written only after
every shard, so a reader of the destination never sees a manifest whose shards are missing.
"""

from __future__ import annotations

import os
from typing import Any

from cache_format._files import copy_hashing, temp_name
from cache_format.errors import CacheError, CacheExistsError
from cache_format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES
from cache_format.reader import check_sha256, open_cache
from cache_format.storage import is_remote


def _dest_fs(dst: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec.core

    if not is_remote(dst):
        local = dst[len("file://"):] if dst.startswith("file://") else dst
        os.makedirs(local, exist_ok=True)
        return fsspec.filesystem("file"), os.path.abspath(local)
    fs, root = fsspec.core.url_to_fs(dst, **(storage_options or {}))
    return fs, root.rstrip("/")


def copy_cache(src: str | os.PathLike[str], dst: str, *, src_storage_options: dict[str, Any] | None = None,
               dst_storage_options: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Copy the finished cache ``src`` to ``dst`` (local path or URL such as ``s3://bucket/prefix``)."""
    reader = open_cache(src, src_storage_options)
    fs, root = _dest_fs(str(dst), dst_storage_options)
    manifest_path = f"{root}/{MANIFEST_NAME}"
    if fs.exists(manifest_path) and not overwrite:
        raise CacheExistsError(f"{dst} already holds a cache ({MANIFEST_NAME} exists); pass overwrite=True "
                               "(--overwrite) to replace it")
    if overwrite and fs.exists(manifest_path):
        fs.rm(manifest_path)  # first, so the destination never looks complete with mixed shards
    for info in reader.shard_infos:
        with reader.storage.open(info.name) as fin, fs.open(f"{root}/{info.name}", "wb") as fout:
            digest = copy_hashing(fin, fout)
        check_sha256(info, digest, reader.storage.describe(info.name))
    data = reader.storage.read_bytes(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    # Object stores have no rename: a single PUT of the manifest is already all-or-nothing there.
    tmp = f"{root}/{temp_name(MANIFEST_NAME)}" if not is_remote(str(dst)) else manifest_path
    with fs.open(tmp, "wb") as fout:
        fout.write(data)
    if tmp != manifest_path:
        fs.mv(tmp, manifest_path)
    copied = open_cache(dst, dst_storage_options)
    if copied.manifest.num_bytes != reader.manifest.num_bytes:
        raise CacheError(f"copy to {dst} is incomplete: {copied.manifest.num_bytes} bytes != "
                         f"{reader.manifest.num_bytes}; retry")
    return copied.manifest.raw
