"""``copy_cache()``: upload a finished cache to an object store (or download one), manifest last.

The source is never at risk: a destination that is the source, inside it or around it (in any
spelling: ``X/../X``, a trailing slash, a symlink, ``file://``, ``s3a://``) is refused before
anything is touched. A shard appears under its final name at the destination only after its
size and sha256 matched the manifest:

- local destination: written to a kdpipe temporary file, checked, fsynced, renamed (the temporary
  file is removed whatever happens);
- remote destination: read once into memory (at most the manifest's byte count), checked, then
  uploaded in one PUT under its final key — object stores commit a PUT (or multipart upload)
  all-or-nothing, and nothing unchecked is ever sent.

The manifest is written last, so the destination never looks complete before every shard is.
``overwrite`` removes only a kdpipe cache's own files (its manifest, the shards it lists, kdpipe
temporary files and writer-named shards) and only those the new cache does not replace; any
other file at the destination refuses the copy.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from pathlib import Path
from typing import Any

from cache_format._files import atomic_write, copy_shard_verified, fsync_dir, is_leftover, refuse_overlap
from cache_format.errors import CacheError, CacheExistsError, CacheNotFoundError
from cache_format.manifest import MANIFEST_NAME, ShardInfo, printable
from cache_format.reader import open_cache
from cache_format.storage import Storage, is_remote, local_path, remote_errors, remote_filesystem


def copy_cache(src: str | os.PathLike[str], dst: str, *, src_storage_options: dict[str, Any] | None = None,
               dst_storage_options: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Copy the finished cache ``src`` to ``dst`` (local path or URL such as ``s3://bucket/prefix``)."""
    refuse_overlap("copy", dst, dst_storage_options, [(src, src_storage_options)])
    source = Storage(src, src_storage_options)
    try:
        manifest_bytes, manifest = source.read_manifest()
    except CacheNotFoundError:
        source.check_reachable()
        raise
    dest = _Destination(str(dst), dst_storage_options)
    dest.prepare(overwrite, manifest_bytes, {s.name for s in manifest.shards})
    for info in manifest.shards:
        dest.put_shard(source, info)
    dest.put_manifest(manifest_bytes)
    copied = open_cache(dst, dst_storage_options)
    if copied.manifest.num_bytes != manifest.num_bytes:
        raise CacheError(f"copy to {dst} is incomplete: {copied.manifest.num_bytes} bytes != "
                         f"{manifest.num_bytes}; retry")
    return copied.manifest.raw


class _Destination:
    """The root a cache is copied into: a local folder or an object-store prefix."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        self.url = url
        self.storage_options = storage_options
        self.fs: Any = None
        self.tries: int | None = None
        if is_remote(url):
            self.fs, root, self.tries = remote_filesystem(url, storage_options)
            self.root = root.rstrip("/")
        else:
            self.root = os.path.abspath(local_path(url))

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return remote_errors(self.url, action, self.tries) if self.fs is not None else contextlib.nullcontext()

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.fs is not None else os.path.join(self.root, name)

    def entries(self) -> dict[str, bool]:
        """What the root holds: name -> True for a plain file (False: folder, link, pipe...)."""
        if self.fs is None:
            if not os.path.lexists(self.root):
                return {}
            if os.path.islink(self.root) or not os.path.isdir(self.root):
                raise CacheExistsError(f"{self.root} exists and is not a folder; choose a folder for the copy")
            with os.scandir(self.root) as it:
                return {e.name: e.is_file(follow_symlinks=False) for e in it}
        with self._errors("listing"):
            self.fs.invalidate_cache(self.root)
            try:
                listing = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return {}
        return {posixpath.basename(e["name"].rstrip("/")): e.get("type") == "file" for e in listing}

    def prepare(self, overwrite: bool, new_manifest: bytes, new_shards: set[str]) -> None:
        """Refuse foreign content; remove the old cache's own files that the new cache does not replace.

        Shards the new cache also has are left in place, to be replaced atomically by their checked
        copies, and a manifest equal to the new one stays: so even a destination that is the source
        under a spelling nobody can see through (a second endpoint name, a nested bind mount) loses
        nothing — every shard is rewritten with its own checked bytes.
        """
        entries = self.entries()
        old_manifest, listed = self._old_cache() if MANIFEST_NAME in entries else (None, set())
        if old_manifest is not None and not overwrite:
            raise CacheExistsError(f"{self.url} already holds a cache ({MANIFEST_NAME} exists); pass overwrite=True "
                                   "(--overwrite) to replace it")
        foreign = sorted(n for n, is_file in entries.items()
                         if not is_file or not (n == MANIFEST_NAME or n in listed or is_leftover(n)))
        if foreign:
            raise CacheExistsError(
                f"{self.url} holds {printable(repr(foreign[0]))}" + (f" and {len(foreign) - 1} more entries"
                                                                    if len(foreign) > 1 else "")
                + ", not part of a kdpipe cache; copy replaces only a kdpipe cache's own files — choose an empty "
                "folder or prefix, or move those files away")
        stale = [n for n in entries if n not in new_shards and not (n == MANIFEST_NAME and old_manifest == new_manifest)]
        # Manifest first: from then on nobody takes the destination for a complete (old) cache.
        for name in sorted(stale, key=lambda n: n != MANIFEST_NAME):
            with self._errors("removing the old cache from"):
                if self.fs is None:
                    os.unlink(self._path(name))
                else:
                    self.fs.rm_file(self._path(name))
        if self.fs is None:
            os.makedirs(self.root, exist_ok=True)

    def _old_cache(self) -> tuple[bytes | None, set[str]]:
        """The destination's manifest bytes and shard names; refuses a ``manifest.json`` that is not kdpipe's."""
        try:
            data, manifest = Storage(self.url, self.storage_options).read_manifest()
        except CacheNotFoundError:
            return None, set()
        except CacheError as exc:
            raise CacheExistsError(f"{self.url} holds a {MANIFEST_NAME} that is not a readable kdpipe manifest "
                                   f"({exc}); refusing to replace what may not be a kdpipe cache — choose another "
                                   "destination") from None
        return data, {s.name for s in manifest.shards}

    def put_shard(self, source: Storage, info: ShardInfo) -> None:
        if self.fs is None:
            copy_shard_verified(source, info, Path(self.root))
            return
        data = source.read_shard(info.name, info.bytes, info.sha256)  # checked before any byte is uploaded
        with self._errors("uploading to"):
            self.fs.pipe_file(self._path(info.name), data)

    def put_manifest(self, data: bytes) -> None:
        if self.fs is None:
            fsync_dir(Path(self.root))
            atomic_write(Path(self.root) / MANIFEST_NAME, data)
            return
        with self._errors("uploading to"):
            self.fs.pipe_file(self._path(MANIFEST_NAME), data)
