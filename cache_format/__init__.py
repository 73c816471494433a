"""kdpipe's logit cache format v1 (spec: ``SPEC.md``): write, read, verify, merge and copy caches.

Needs numpy, pyarrow and zstandard only; it must never import ``pipeline``, torch or vLLM.
"""

from __future__ import annotations

from cache_format.copy import copy_cache
from cache_format.encodings import (
    ClassLogitsBatch,
    ClassLogitsEncoding,
    SampledBatch,
    SampledEncoding,
    TopKBatch,
    TopKEncoding,
)
from cache_format.errors import (
    CacheError,
    CacheExistsError,
    CacheNotFoundError,
    ChecksumMismatchError,
    DuplicateError,
    IncompatibleCacheError,
    IncompleteCacheError,
)
from cache_format.identity import CacheIdentity, tokenizer_fingerprint
from cache_format.merge import merge_caches
from cache_format.reader import open_cache, read_identity
from cache_format.rows import DecodedRow
from cache_format.verify import verify_cache
from cache_format.writer import CacheWriter

__all__ = [
    "CacheError",
    "CacheExistsError",
    "CacheIdentity",
    "CacheNotFoundError",
    "CacheWriter",
    "ChecksumMismatchError",
    "ClassLogitsBatch",
    "ClassLogitsEncoding",
    "DecodedRow",
    "DuplicateError",
    "IncompatibleCacheError",
    "IncompleteCacheError",
    "SampledBatch",
    "SampledEncoding",
    "TopKBatch",
    "TopKEncoding",
    "copy_cache",
    "merge_caches",
    "open_cache",
    "read_identity",
    "tokenizer_fingerprint",
    "verify_cache",
]
