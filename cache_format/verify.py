"""``verify_cache()``: checksums, counts and every decoded row's invariants, stopping at the first problem."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from cache_format.encodings import ENCODINGS, Encoding
from cache_format.errors import DuplicateError, InvariantError
from cache_format.reader import CacheReader, check_sha256, open_cache, sha256_of
from cache_format.rows import DecodedRow


def check_row(row: DecodedRow, encoding: Encoding, id_limit: int, shard: str) -> None:
    """Raise InvariantError naming shard/row/sample when a decoded row breaks the spec's invariants."""
    where = f"shard {shard} row {row.row_index} (sample_id {row.sample_id!r})"
    p, x = row.positions, row.input_ids
    if p.size and (int(p[0]) < 0 or int(p[-1]) >= len(x) or (np.diff(p) <= 0).any()):
        raise InvariantError(f"{where}: positions must be strictly increasing within [0, {len(x)})")
    if x.size and id_limit and (int(x.min()) < 0 or int(x.max()) >= id_limit):
        raise InvariantError(f"{where}: input_ids hold an id outside [0, {id_limit})")
    ENCODINGS[encoding.kind].check_row(row, encoding, id_limit, where)


def verify_cache(path: str | os.PathLike[str] | CacheReader, storage_options: dict[str, Any] | None = None, *,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Check every shard (size, sha256, schema, counts) and every row; return a summary or raise the first error."""
    reader = path if isinstance(path, CacheReader) else open_cache(path, storage_options)
    encoding = reader.identity.encoding
    limit = reader.identity.id_limit
    seen: dict[str, str] = {}
    rows = 0
    for i, info in enumerate(reader.shard_infos):
        size = reader.storage.size(info.name) if reader.storage.exists(info.name) else -1
        if size == info.bytes:  # a size mismatch is reported (more precisely) by the reader below
            check_sha256(info, sha256_of(reader.storage, info.name), reader.storage.describe(info.name))
        for row in reader.iter_rows([i]):
            check_row(row, encoding, limit, info.name)
            if row.sample_id in seen:
                raise DuplicateError(f"sample_id {row.sample_id!r} appears in shard {seen[row.sample_id]} and again "
                                     f"in shard {info.name} row {row.row_index}; sample ids must be unique")
            seen[row.sample_id] = info.name
            rows += 1
        if progress is not None:
            progress(f"ok {info.name} ({info.rows} rows)")
    reader.close()
    m = reader.manifest
    return {"ok": True, "shards": len(m.shards), "rows": rows, "tokens": m.num_tokens, "positions": m.num_positions,
            "bytes": m.num_bytes}
