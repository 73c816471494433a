"""Where a cache lives: a local directory, or a remote URL through fsspec (imported only then)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

from cache_format.errors import CacheError, CacheNotFoundError

# URL schemes read through fsspec; anything else with "://" is refused with a clear message.
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "hf", "az", "abfs", "http", "https", "memory")


def is_remote(path: str | os.PathLike[str]) -> bool:
    s = str(path)
    return "://" in s and not s.startswith("file://")


class Storage:
    """Read-only access to the files of one cache root."""

    def __init__(self, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(path)
        self._fs: Any = None
        if is_remote(path):
            scheme = self.url.split("://", 1)[0]
            if scheme not in REMOTE_SCHEMES:
                raise CacheError(f"cache URL {self.url!r} has scheme {scheme!r}; use a local path or one of "
                                 f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
            try:
                import fsspec.core
            except ImportError:  # pragma: no cover - fsspec is a dependency of kdpipe
                raise CacheError(f"reading {self.url} needs the fsspec package: pip install fsspec") from None
            try:
                self._fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
            except (ImportError, ValueError) as exc:
                raise CacheError(f"cannot open {self.url}: {exc} (install the filesystem package, e.g. s3fs, "
                                 "gcsfs or huggingface_hub, and check storage_options)") from None
            self.root = root.rstrip("/")
        else:
            local = self.url[len("file://"):] if self.url.startswith("file://") else self.url
            self.root = str(Path(local))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if self._fs is not None else os.path.join(self.root, name)

    def exists(self, name: str) -> bool:
        if self._fs is None:
            return os.path.exists(self.path(name))
        return bool(self._fs.exists(self.path(name)))

    def is_empty(self) -> bool:
        """True when the root does not exist or holds nothing; a local root that is a file is an error."""
        if self._fs is None:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise CacheNotFoundError(f"{self.root} is a file, not a cache folder; give the cache's folder")
            return not os.path.isdir(self.root) or not os.listdir(self.root)
        try:
            return not self._fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return True

    def size(self, name: str) -> int:
        try:
            if self._fs is None:
                return os.path.getsize(self.path(name))
            return int(self._fs.size(self.path(name)))
        except (FileNotFoundError, OSError) as exc:
            raise CacheNotFoundError(f"{self.describe(name)} cannot be read: {exc}") from None

    def open(self, name: str) -> BinaryIO:
        try:
            if self._fs is None:
                return open(self.path(name), "rb")  # the caller closes it
            return self._fs.open(self.path(name), "rb")
        except FileNotFoundError:
            raise CacheNotFoundError(f"{self.describe(name)} does not exist") from None
        except OSError as exc:
            raise CacheNotFoundError(f"{self.describe(name)} cannot be opened: {exc}") from None

    def read_bytes(self, name: str, max_bytes: int) -> bytes:
        """Read at most ``max_bytes + 1`` bytes, so an oversized file is detected without reading it all."""
        with self.open(name) as fh:
            return fh.read(max_bytes + 1)

    def describe(self, name: str) -> str:
        return self.path(name) if self._fs is None else f"{self.url.rstrip('/')}/{name}"
