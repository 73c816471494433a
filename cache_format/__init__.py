"""kdpipe's logit cache format, v1: spec in ``SPEC.md``; needs numpy and pyarrow only (never torch).

Public API (see ``docs/ARCHITECTURE.md``)::

    CacheIdentity, TopKEncoding, SampledEncoding, ClassLogitsEncoding, tokenizer_fingerprint
    CacheWriter, TopKBatch, SampledBatch, ClassLogitsBatch
    open_cache, CacheReader, DecodedRow, verify_cache, merge_caches, copy_cache
"""

from __future__ import annotations

from cache_format.batches import ClassLogitsBatch, DecodedRow, SampledBatch, TopKBatch
from cache_format.copy import copy_cache
from cache_format.errors import (
    CacheError,
    CacheExistsError,
    CacheNotFoundError,
    ChecksumMismatchError,
    CountMismatchError,
    DuplicateError,
    EncodingError,
    IncompatibleCacheError,
    IncompleteCacheError,
    InvariantError,
    ManifestError,
    ManifestTooLargeError,
    ShardCorruptError,
    ShardTruncatedError,
    UnsafePathError,
    UnsupportedVersionError,
    WriterStateError,
)
from cache_format.identity import (
    CacheIdentity,
    ClassLogitsEncoding,
    SampledEncoding,
    TopKEncoding,
    tokenizer_fingerprint,
)
from cache_format.manifest import Manifest, ShardInfo
from cache_format.merge import merge_caches
from cache_format.reader import CacheReader, open_cache
from cache_format.shard import FORMAT_NAME, FORMAT_VERSION
from cache_format.verify import verify_cache
from cache_format.writer import CacheWriter

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CacheError",
    "CacheExistsError",
    "CacheIdentity",
    "CacheNotFoundError",
    "CacheReader",
    "CacheWriter",
    "ChecksumMismatchError",
    "ClassLogitsBatch",
    "ClassLogitsEncoding",
    "CountMismatchError",
    "DecodedRow",
    "DuplicateError",
    "EncodingError",
    "IncompatibleCacheError",
    "IncompleteCacheError",
    "InvariantError",
    "Manifest",
    "ManifestError",
    "ManifestTooLargeError",
    "SampledBatch",
    "SampledEncoding",
    "ShardCorruptError",
    "ShardInfo",
    "ShardTruncatedError",
    "TopKBatch",
    "TopKEncoding",
    "UnsafePathError",
    "UnsupportedVersionError",
    "WriterStateError",
    "copy_cache",
    "merge_caches",
    "open_cache",
    "tokenizer_fingerprint",
    "verify_cache",
]
