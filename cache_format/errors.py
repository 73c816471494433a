"""The cache library's error hierarchy. Every message names the file, shard, row or field."""

from __future__ import annotations


class CacheError(Exception):
    """Base class of every error raised by ``cache_format``."""
