"""Where the writer, ``finalize_cache`` and ``merge`` put a cache: a local folder or an object-store prefix.

Every write commits whole or not at all:

- local folder: a temporary name, fsync, rename, directory fsync (a crash leaves the old file or
  the new one, never a torn one);
- object store (any fsspec URL: ``s3://``, ``gs://``, ``memory://``...): one PUT per object
  (``fs.pipe_file``) — an object store makes an object visible whole or not at all, so a shard
  or marker is uploaded directly under its final name and nothing needs renaming.

Remote requests get the timeouts and bounded retries of :func:`cache_format.storage.remote_filesystem`,
plus an overall deadline per request (see :func:`_deadline_s`): a server that stops answering in the
middle of an upload (botocore's ``Expect: 100-continue`` handshake can wait forever on a frozen
server) ends in a :class:`RemoteStorageError` naming the URL, the action and the tries.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from pathlib import Path
from typing import Any

from cache_format._files import atomic_write, fsync_dir, temp_name, write_synced
from cache_format.errors import CacheExistsError, RemoteStorageError
from cache_format.storage import (
    REMOTE_SCHEMES,
    S3_CONFIG_DEFAULTS,
    Storage,
    is_remote,
    local_path,
    remote_errors,
    remote_filesystem,
)

# Lowest upload speed assumed when bounding one request's time: a shard of 256 MiB then gets ~4.5 min on
# top of the per-try timeouts, which no working store needs, while a frozen one still fails in bounded time.
_MIN_BYTES_PER_S = 1024 * 1024
# Slack on top of tries x (connect + read timeout): botocore's backoff between tries is capped at 20 s.
_DEADLINE_SLACK_S = 10.0


class WriteTarget:
    """One cache root that the writer may change; see the module docstring."""

    url: str
    remote: bool

    def describe(self, name: str = "") -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def list_files(self) -> dict[str, int | None]:
        """Every entry directly under the root: name -> size in bytes, None for anything but a regular file."""
        raise NotImplementedError

    def put(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically (the commit of a shard, marker or manifest)."""
        raise NotImplementedError

    def stage(self, name: str, data: bytes) -> Any:
        """Hold ``data`` until :meth:`commit` gives it its final name (a shard whose unit is not ended yet)."""
        raise NotImplementedError

    def commit(self, staged: Any, name: str) -> None:
        raise NotImplementedError

    def discard(self, staged: Any) -> None:
        raise NotImplementedError

    def read(self, name: str, max_bytes: int) -> bytes:
        """A small file (marker, manifest) whole; refused when over ``max_bytes``."""
        return self.storage.read_bytes(name, max_bytes)

    def delete(self, name: str) -> None:
        """Remove ``name``; a missing one is fine (another worker or an earlier run removed it)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make the renames so far durable (local folders); object stores commit each PUT on its own."""

    def makedirs(self) -> None:
        """Create the root (local folders); an object store has no folders to create."""

    storage: Storage  # the read side of the same root (shard footers, checksums)


class LocalTarget(WriteTarget):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(local_path(str(root)))
        self.url = str(self.root)
        self.remote = False
        self.storage = Storage(str(self.root))

    def describe(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def list_files(self) -> dict[str, int | None]:
        if not os.path.lexists(self.root):
            return {}
        if self.root.is_symlink() or not self.root.is_dir():
            raise CacheExistsError(f"{self.root} exists and is not a directory; choose another output path")
        out: dict[str, int | None] = {}
        with os.scandir(self.root) as it:
            for e in it:
                try:
                    out[e.name] = e.stat(follow_symlinks=False).st_size if e.is_file(follow_symlinks=False) else None
                except FileNotFoundError:
                    continue  # renamed or removed meanwhile by another worker (a temporary file committed)
        return out

    def makedirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: bytes) -> None:
        self.makedirs()
        atomic_write(self.root / name, data)

    def stage(self, name: str, data: bytes) -> Any:
        tmp = self.root / temp_name(name)
        write_synced(tmp, data)
        return tmp

    def commit(self, staged: Any, name: str) -> None:
        os.replace(staged, self.root / name)

    def discard(self, staged: Any) -> None:
        Path(staged).unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def sync(self) -> None:
        fsync_dir(self.root)


class RemoteTarget(WriteTarget):
    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in REMOTE_SCHEMES:
            raise RemoteStorageError(f"cache URL {url!r} has scheme {scheme!r}; use a local path or one of "
                                     f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
        self.url = url.rstrip("/")
        self.remote = True
        self.fs, root, self.tries = remote_filesystem(url, storage_options)
        self.root = root.rstrip("/")
        self.storage = Storage(url, storage_options)
        config = {**S3_CONFIG_DEFAULTS, **((storage_options or {}).get("config_kwargs") or {})}
        self._per_try_s = float(config.get("connect_timeout") or 60) + float(config.get("read_timeout") or 60)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _deadline_s(self, nbytes: int) -> float:
        """Overall bound of one request: every try's timeouts, backoff slack, and the bytes at a slow speed."""
        return (self.tries or 3) * self._per_try_s + _DEADLINE_SLACK_S + nbytes / _MIN_BYTES_PER_S

    def _errors(self, name: str, action: str) -> contextlib.AbstractContextManager[None]:
        return remote_errors(self.describe(name), action, self.tries)

    def _call(self, method: str, name: str, action: str, *args: Any, nbytes: int = 0) -> Any:
        fn = getattr(self.fs, method)
        kwargs: dict[str, Any] = {}
        if getattr(self.fs, "async_impl", False):  # fsspec's sync() takes the deadline; the request is cancelled
            kwargs["timeout"] = self._deadline_s(nbytes)
        with self._errors(name, action):
            return fn(*args, **kwargs)

    def list_files(self) -> dict[str, int | None]:
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache(self.root)  # another worker may have written since our last listing
        try:
            listing = self._call("ls", "", "listing", self.root, True)
        except FileNotFoundError:
            return {}
        out: dict[str, int | None] = {}
        for e in listing:
            name = posixpath.basename(str(e["name"]).rstrip("/"))
            out[name] = int(e.get("size") or 0) if e.get("type") == "file" else None
        return out

    def put(self, name: str, data: bytes) -> None:
        self._call("pipe_file", name, "uploading", self._path(name), bytes(data), nbytes=len(data))

    def stage(self, name: str, data: bytes) -> Any:
        # Held in memory until the unit ends (one unit's encoded shards), then uploaded under the final name:
        # an object store has no rename, and a temporary object would double the requests.
        return data

    def commit(self, staged: Any, name: str) -> None:
        self.put(name, staged)

    def discard(self, staged: Any) -> None:
        return None

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("rm_file", name, "removing", self._path(name))


def open_target(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> WriteTarget:
    """The write side of cache root ``url`` (local path, ``file://`` or a remote URL)."""
    if is_remote(url):
        return RemoteTarget(str(url), storage_options)
    return LocalTarget(url)
