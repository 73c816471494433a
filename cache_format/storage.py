"""Where a cache lives (a local directory, or a remote URL through fsspec), and the only way kdpipe opens its files.

Every cache is untrusted input (SPEC §1): a file is opened only when it is a regular file directly
inside the root (never a symlink, FIFO, device or directory; checked with ``lstat`` before opening
and ``fstat`` on the opened descriptor), and never read beyond the byte count the manifest gives.
Remote stores get connect/read timeouts and a bounded number of tries; their failures become
:class:`RemoteStorageError` naming the URL.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import os
import posixpath
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from cache_format.errors import (
    CacheError,
    CacheNotFoundError,
    ChecksumMismatchError,
    IncompleteCacheError,
    ManifestTooLargeError,
    RemoteStorageError,
    ShardCorruptError,
    ShardTruncatedError,
    UnsafeFileError,
)
from cache_format.manifest import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    parse_manifest,
    printable,
)

# URL schemes read through fsspec; anything else with "://" is refused with a clear message.
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "hf", "az", "abfs", "http", "https", "memory")
# Bytes per read when hashing or copying a shard: large enough for (object-store) throughput, small for memory.
CHUNK_BYTES = 8 * 1024 * 1024
# O_NOFOLLOW: a symlink swapped in after lstat fails to open. O_NONBLOCK: a FIFO swapped in never blocks open().
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
               | getattr(os, "O_CLOEXEC", 0))
# s3 defaults, each overridable through storage_options["config_kwargs"]: a store that stops answering
# fails after at most total_max_attempts x (connect + read timeout) plus short backoffs, never hangs.
S3_CONFIG_DEFAULTS: dict[str, Any] = {"connect_timeout": 10, "read_timeout": 20,
                                      "retries": {"total_max_attempts": 4, "mode": "standard"}}
_BUCKET_STORES = ("s3", "s3a", "gs", "gcs")
_NOT_REGULAR = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))


def is_remote(path: str | os.PathLike[str]) -> bool:
    s = str(path)
    return "://" in s and not s.startswith("file://")


def local_path(path: str | os.PathLike[str]) -> str:
    s = str(path)
    return s[len("file://"):] if s.startswith("file://") else s


def check_regular(st: os.stat_result, where: str) -> None:
    """Refuse anything but a regular file, naming what it is: a shared cache must not make kdpipe read elsewhere."""
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((what for test, what in _NOT_REGULAR if test(st.st_mode)), "not a regular file")
    raise UnsafeFileError(f"{where} is {kind}; a cache may hold only regular files inside its folder (links, pipes "
                          "and devices are refused so a shared cache cannot make kdpipe read other files or hang) "
                          "— replace it with the real file, e.g. re-copy the cache with `cp -rL` or re-download it")


def location(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> tuple[str, str, str]:
    """(store, endpoint, canonical path) of a cache root, to tell whether two spellings name the same place.

    Local paths are resolved (``..``, symlinks, ``file://``, trailing slashes); remote ones are normalised
    (``s3a://`` is ``s3://``, repeated or trailing slashes). Different endpoints count as different stores.
    """
    s = str(url)
    if not is_remote(s):
        return "file", "", os.path.realpath(local_path(s))
    scheme, rest = s.split("://", 1)
    store = {"s3a": "s3", "gcs": "gs", "abfs": "az"}.get(scheme.lower(), scheme.lower())
    opts = storage_options or {}
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url") or ""
    return store, str(endpoint).rstrip("/"), posixpath.normpath("/" + rest)


def overlaps(a: tuple[str, str, str], b: tuple[str, str, str]) -> bool:
    """True when the roots ``a`` and ``b`` (from :func:`location`) are the same place or one holds the other."""
    if a[:2] != b[:2]:
        return False
    pa_, pb = a[2].rstrip("/") + "/", b[2].rstrip("/") + "/"
    return pa_.startswith(pb) or pb.startswith(pa_)


class Storage:
    """Read-only access to the files of one cache root."""

    def __init__(self, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(path)
        self._fs: Any = None
        self._tries: int | None = None
        if is_remote(path):
            scheme = self.url.split("://", 1)[0]
            if scheme not in REMOTE_SCHEMES:
                raise CacheError(f"cache URL {self.url!r} has scheme {scheme!r}; use a local path or one of "
                                 f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
            self._fs, root, self._tries = remote_filesystem(self.url, storage_options)
            self.root = root.rstrip("/")
            # fsspec shares one filesystem (and its listing cache) per process: a listing taken before another
            # process (a dump worker) wrote the manifest would hide it. A new Storage sees the store as it is now.
            with contextlib.suppress(AttributeError):
                self._fs.invalidate_cache(self.root)
        else:
            self.root = str(Path(local_path(self.url)))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if self._fs is not None else os.path.join(self.root, name)

    def describe(self, name: str) -> str:
        return self.path(name) if self._fs is None else f"{self.url.rstrip('/')}/{name}"

    def _errors(self, name: str, action: str) -> contextlib.AbstractContextManager[None]:
        if self._fs is None:
            return contextlib.nullcontext()
        return remote_errors(self.describe(name), action, self._tries)

    def exists(self, name: str) -> bool:
        """Whether ``name`` is there (a symlink counts, dangling or not: opening it is refused with its reason)."""
        if self._fs is None:
            return os.path.lexists(self.path(name))
        with self._errors(name, "checking"):
            return bool(self._fs.exists(self.path(name)))

    def is_empty(self) -> bool:
        """True when the root does not exist or holds nothing; a local root that is a file is an error."""
        if self._fs is None:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise CacheNotFoundError(f"{self.root} is a file, not a cache folder; give the cache's folder")
            return not os.path.isdir(self.root) or not os.listdir(self.root)
        try:
            with self._errors("", "listing"):
                return not self._fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return True

    def size(self, name: str) -> int:
        """Size of the regular file ``name`` (refused when it is a link, FIFO, device or directory)."""
        try:
            if self._fs is None:
                st = os.lstat(self.path(name))
                check_regular(st, self.describe(name))
                return st.st_size
            return self._remote_size(name)
        except FileNotFoundError:
            raise CacheNotFoundError(f"{self.describe(name)} does not exist") from None
        except OSError as exc:
            raise CacheNotFoundError(f"{self.describe(name)} cannot be read: {exc}") from None

    def _remote_size(self, name: str) -> int:
        with self._errors(name, "looking up"):
            info = self._fs.info(self.path(name))
        if info.get("type") != "file":
            raise UnsafeFileError(f"{self.describe(name)} is a {info.get('type')}, not a file; a cache holds "
                                  "only files directly under its prefix — re-upload the cache")
        return int(info.get("size") or 0)

    def _open_fd(self, name: str) -> tuple[int, int]:
        """Open local ``name`` without following links or blocking; (fd, size) once fstat shows a regular file."""
        where = self.describe(name)
        check_regular(os.lstat(self.path(name)), where)  # FileNotFoundError goes to the caller
        try:
            fd = os.open(self.path(name), _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):  # swapped for a link after the lstat above
                raise UnsafeFileError(f"{where} became a symbolic link while being opened; refused") from None
            raise
        try:
            st = os.fstat(fd)
            check_regular(st, where)
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def open(self, name: str) -> BinaryIO:
        """A regular file of the cache, opened safely (see the module docstring); the caller closes it."""
        return self._open_with_size(name)[0]

    def _open_with_size(self, name: str) -> tuple[BinaryIO, int]:
        try:
            if self._fs is None:
                fd, size = self._open_fd(name)
                return open(fd, "rb"), size
            size = self._remote_size(name)
            with self._errors(name, "opening"):
                return self._fs.open(self.path(name), "rb"), size
        except FileNotFoundError:
            raise CacheNotFoundError(f"{self.describe(name)} does not exist") from None
        except OSError as exc:
            raise CacheNotFoundError(f"{self.describe(name)} cannot be opened: {exc}") from None

    def read_bytes(self, name: str, max_bytes: int) -> bytes:
        """The whole (small) file ``name``, e.g. the manifest; refused unread when over ``max_bytes``.

        Reads at most ``max_bytes + 1`` bytes even if the file grows meanwhile, so the caller's
        parser still sees the excess.
        """
        fh, size = self._open_with_size(name)
        with fh, self._errors(name, "reading"):
            if size > max_bytes:
                raise ManifestTooLargeError(f"{self.describe(name)} is {size} bytes, over the {max_bytes} byte cap; "
                                            "it is not a kdpipe manifest (or is corrupt) — re-create or re-download "
                                            "the cache")
            return fh.read(max_bytes + 1)

    def read_manifest(self) -> tuple[bytes, Manifest]:
        """The manifest's bytes and the validated manifest; refuses unfinished caches and non-caches clearly."""
        if not self.exists(MANIFEST_NAME):
            if self.exists(INCOMPLETE_MARKER):
                raise IncompleteCacheError(
                    f"{self.describe('')} is an unfinished cache (no {MANIFEST_NAME}; the dump is still running or "
                    "was interrupted): rerun the same kdpipe dump-teacher command (it resumes and finalizes; CacheWriter mode='resume'), then read it")
            raise CacheNotFoundError(f"{self.describe(MANIFEST_NAME)} does not exist: {self.url} is not a kdpipe "
                                     "cache (check the path, or that the upload finished)")
        data = self.read_bytes(MANIFEST_NAME, MAX_MANIFEST_BYTES)
        return data, parse_manifest(data, self.describe(MANIFEST_NAME))

    # ------------------------------------------------------------ shards

    def _open_sized(self, name: str, expected_bytes: int) -> BinaryIO:
        """Open shard ``name`` once it is known to be a regular file of exactly ``expected_bytes``."""
        where = self.describe(name)
        try:
            if self._fs is None:
                fd, size = self._open_fd(name)
            else:
                size = self._remote_size(name)
        except FileNotFoundError:
            raise ShardCorruptError(f"shard {where} is listed in the manifest but missing; re-copy the whole cache "
                                    "directory (or re-dump)") from None
        except OSError as exc:
            raise ShardCorruptError(f"shard {where} cannot be opened ({exc}); check its permissions") from None
        if size != expected_bytes:
            if self._fs is None:
                os.close(fd)
            raise ShardTruncatedError(
                f"shard {where} is {size} bytes but the manifest says {expected_bytes}: an interrupted copy/upload "
                "or a damaged file — re-copy the cache, or re-dump this shard")
        if self._fs is None:
            return open(fd, "rb")
        with self._errors(name, "opening"):
            return self._fs.open(self.path(name), "rb", block_size=CHUNK_BYTES, cache_type="none")

    def shard_chunks(self, name: str, expected_bytes: int) -> Iterator[bytes]:
        """The bytes of shard ``name`` in chunks; never reads past ``expected_bytes`` (+1 byte to see growth).

        Type, size and openability are checked when this is called, before the first chunk is asked for.
        """
        return self._chunks(self._open_sized(name, expected_bytes), name, expected_bytes)

    def _chunks(self, fh: BinaryIO, name: str, expected_bytes: int) -> Iterator[bytes]:
        with fh, self._errors(name, "reading"):
            left = expected_bytes
            while left > 0:
                chunk = fh.read(min(CHUNK_BYTES, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
            if left or fh.read(1):
                raise ShardTruncatedError(f"shard {self.describe(name)} changed size while being read (the manifest "
                                          f"says {expected_bytes} bytes); re-copy the cache, or re-dump this shard")

    def open_shard(self, name: str, expected_bytes: int, expected_sha256: str | None = None) -> BinaryIO:
        """Shard ``name`` as a binary file object for ``pa.ipc.open_file``, after the checks of SPEC §1.

        With ``expected_sha256`` (and always for remote stores, so no request is left to happen lazily
        inside Arrow) the shard is read into memory in one bounded pass, hashed on the way, and served
        from memory: what Arrow decodes is exactly what was checked.
        """
        if expected_sha256 is None and self._fs is None:
            return self._open_sized(name, expected_bytes)
        return pa.BufferReader(pa.py_buffer(self.read_shard(name, expected_bytes, expected_sha256)))

    def read_shard(self, name: str, expected_bytes: int, expected_sha256: str | None) -> bytearray:
        """The bytes of shard ``name`` (one pass, at most ``expected_bytes``), checked against ``expected_sha256``."""
        digest = hashlib.sha256()
        chunks = self.shard_chunks(name, expected_bytes)  # size checked here, before the buffer is allocated
        buf = bytearray(expected_bytes)
        pos = 0
        for chunk in chunks:
            digest.update(chunk)
            buf[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise sha256_mismatch(self.describe(name), digest.hexdigest(), expected_sha256)
        return buf

    def check_reachable(self) -> None:
        """For a remote root whose manifest is missing: a missing bucket is a RemoteStorageError, not "no cache"."""
        scheme = self.url.split("://", 1)[0].lower()
        if self._fs is None or scheme not in _BUCKET_STORES:
            return
        bucket = self.root.strip("/").split("/", 1)[0]
        with self._errors("", "checking the bucket of"):
            found = bool(self._fs.exists(bucket))
        if not found:
            raise RemoteStorageError(f"{self.describe('')}: bucket {bucket!r} does not exist or these credentials "
                                     "cannot see it; check the bucket name, --endpoint-url and credentials")


def sha256_mismatch(where: str, got: str, want: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(f"shard {where}: sha256 {got[:16]}… differs from the manifest's {want[:16]}…; the "
                                 "file changed after it was written — re-copy or re-dump it")


# ------------------------------------------------------------ remote stores


def remote_filesystem(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str, int | None]:
    """(fsspec filesystem, root inside it, tries per request or None) with kdpipe's timeouts and retries applied."""
    try:
        import fsspec.core
    except ImportError:  # pragma: no cover - fsspec is a dependency of kdpipe
        raise CacheError(f"reading {url} needs the fsspec package: pip install fsspec") from None
    scheme = url.split("://", 1)[0].lower()
    opts = dict(storage_options or {})
    tries = None
    if scheme in ("s3", "s3a"):
        config = {**S3_CONFIG_DEFAULTS, **(opts.get("config_kwargs") or {})}
        opts["config_kwargs"] = config
        retries = config.get("retries") or {}
        # botocore: total_max_attempts counts the first try, max_attempts only the retries.
        tries = int(retries.get("total_max_attempts") or retries.get("max_attempts", 2) + 1)
    try:
        fs, root = fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError, TypeError) as exc:
        raise CacheError(f"cannot open {url}: {printable(str(exc))} (install the filesystem package, e.g. s3fs, "
                         "gcsfs or huggingface_hub, and check storage_options)") from None
    if tries is not None:
        fs.retries = 1  # botocore retries (bounded above); s3fs's own loop around them would multiply the tries
    return fs, str(root), tries


@functools.cache
def _failure_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the store failed" (network, timeout, refused, forbidden), whichever library raised them."""
    found: list[type[BaseException]] = [OSError, TimeoutError]
    for module, name in (("botocore.exceptions", "BotoCoreError"), ("botocore.exceptions", "ClientError"),
                         ("aiohttp", "ClientError"), ("fsspec.exceptions", "FSTimeoutError")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


@contextlib.contextmanager
def remote_errors(where: str, action: str, tries: int | None) -> Iterator[None]:
    """Turn a store's failure inside the block into one RemoteStorageError naming ``where``; not-found passes."""
    try:
        yield
    except (CacheError, FileNotFoundError):
        raise
    except _failure_types() as exc:
        raise RemoteStorageError(_failure_message(where, action, exc, tries)) from None


def _failure_message(where: str, action: str, exc: BaseException, tries: int | None) -> str:
    text = printable(f"{type(exc).__name__}: {exc}", 300)
    low = text.lower()
    retried = True
    # 403 as a status code, never digits of a port or a size inside the message ("127.0.0.1:40363").
    forbidden = re.search(r"(?<![\d:.])403(?!\d)", low) is not None
    if isinstance(exc, PermissionError) or forbidden or any(s in low for s in ("forbidden", "accessdenied",
                                                                                "access denied")):
        what, fix, retried = "was refused: access denied (403)", "check the credentials and the bucket policy", False
    elif "nosuchbucket" in low or "bucket does not exist" in low:
        what, fix, retried = "failed: the bucket does not exist", "check the bucket name and --endpoint-url", False
    elif "timeout" in low or "timed out" in low:
        what = "timed out"
        fix = "check the network, or raise connect_timeout/read_timeout in storage_options['config_kwargs']"
    elif any(s in low for s in ("connect", "refused", "unreachable", "reset", "closed")):
        what, fix = "could not reach the server", "check --endpoint-url and that the store is up"
    else:
        what, fix = "failed", "check the URL, the endpoint and the credentials"
    after = f" after {tries} tries" if retried and tries else ""
    return f"{action} {where} {what}{after} ({text}); {fix}"
