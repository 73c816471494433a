"""The cache library's error hierarchy. Every message names the file, shard, row or field.

The CLI prints ``error: <message>`` for any :class:`CacheError` and exits with code 2, so a
message must be understandable on its own and say what to do next.
"""

from __future__ import annotations


class CacheError(Exception):
    """Base class of every error raised by ``cache_format``."""


class CacheNotFoundError(CacheError):
    """The path holds no cache (no ``manifest.json`` and no unfinished-cache marker)."""


class IncompleteCacheError(CacheError):
    """The cache was never finalized (dump still running, or interrupted): resume it first."""


class MissingUnitsError(IncompleteCacheError):
    """Finalizing a cache whose dump has not completed every unit yet (other workers still running, or killed)."""

    def __init__(self, message: str, missing: list[int] | None = None, totals: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])
        self.totals = dict(totals or {})  # of the units present


class CacheExistsError(CacheError):
    """A writer in ``create`` mode found a non-empty directory, or ``overwrite`` found foreign files."""


class ManifestError(CacheError):
    """``manifest.json`` is unreadable, too large, not JSON, or violates the schema."""


class ManifestTooLargeError(ManifestError):
    """``manifest.json`` is over the size cap (64 MiB): hostile or corrupt, never read whole."""


class UnsupportedVersionError(ManifestError):
    """The cache (manifest or shard) declares a format major version this library cannot read."""


class UnsafePathError(ManifestError):
    """A shard name in the manifest could escape the cache root (``..``, ``/``, absolute path, odd characters)."""


class ShardCorruptError(CacheError):
    """A shard file is missing, truncated, not Arrow, or its schema does not match the spec."""


class ChecksumMismatchError(ShardCorruptError):
    """A shard's size or sha256 differs from the manifest: the file changed after the cache was written."""


class ShardTruncatedError(ShardCorruptError):
    """A shard file is shorter (or longer) than the manifest's byte count: an interrupted copy or upload."""


class CountMismatchError(ShardCorruptError):
    """A shard's row or token count differs from what the manifest says."""


class InvariantError(ShardCorruptError):
    """A decoded row breaks a format invariant (id >= vocab, log-prob > 0, unsorted, tail outside [0, 1], ...)."""


class IncompatibleCacheError(CacheError):
    """Two identities differ (resume into another cache, merge of caches from different dumps)."""


class DuplicateError(CacheError):
    """A sample id or work unit appears twice (in one write, across units, or across merged caches)."""


class EncodingError(CacheError):
    """Data given to the writer cannot be encoded (NaN/inf, id out of range, bad shape, unsorted...)."""


class WriterStateError(CacheError):
    """The writer was used out of order (write after finalize, unit ended twice, unit already complete...)."""


class UnsafeFileError(CacheError):
    """A cache file is a symlink, FIFO, device or directory: refused before a single byte is read."""


class RemoteStorageError(CacheError):
    """An object store could not be reached or refused a request (timeout, connection refused, forbidden...)."""


class SamePathError(CacheExistsError):
    """A copy or merge whose destination is (inside) one of its sources: refused before anything is touched."""
