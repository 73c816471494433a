"""``verify_cache()``: checksums, counts and every decoded row's invariants, stopping at the first problem.

The row rules are the decoder's own (``CacheReader`` applies them to every record batch it
reads, see ``encodings/`` and ``rows.check_common``), so whatever a consumer can read, ``verify``
accepts, and the other way round; this module adds what needs the whole cache: checksums and
unique sample ids.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from cache_format.errors import DuplicateError
from cache_format.manifest import printable
from cache_format.reader import CacheReader, open_cache


def verify_cache(path: str | os.PathLike[str] | CacheReader, storage_options: dict[str, Any] | None = None, *,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Check every shard (size, sha256, schema, counts) and every row; return a summary or raise the first error."""
    # The reader hashes each shard as it reads it (one pass) and decodes exactly the bytes it hashed.
    reader = path if isinstance(path, CacheReader) else open_cache(path, storage_options, verify_checksums=True)
    reader.verify_checksums = True
    seen: dict[str, str] = {}
    rows = 0
    for i, info in enumerate(reader.shard_infos):
        for row in reader.iter_rows([i]):
            if row.sample_id in seen:
                raise DuplicateError(f"sample_id {printable(repr(row.sample_id), 80)} appears in shard {seen[row.sample_id]} and again "
                                     f"in shard {info.name} row {row.row_index}; sample ids must be unique — "
                                     "re-merge the cache from its parts or re-dump it")
            seen[row.sample_id] = info.name
            rows += 1
        if progress is not None:
            progress(f"ok {info.name} ({info.rows} rows)")
    reader.close()
    m = reader.manifest
    return {"ok": True, "shards": len(m.shards), "rows": rows, "tokens": m.num_tokens, "positions": m.num_positions,
            "bytes": m.num_bytes}
