"""``verify_cache()``: checksums, counts and every decoded row's invariants, stopping at the first problem."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from cache_format.batches import DecodedRow
from cache_format.errors import DuplicateError, InvariantError
from cache_format.reader import CacheReader, check_sha256, open_cache, sha256_of

# Tolerance on the sum of a decoded top-k+tail distribution (float32 rounding of 129 terms).
_SUM_TOLERANCE = 1e-3


def check_row(row: DecodedRow, kind: str, id_limit: int, num_draws: int | None, shard: str) -> None:
    """Raise InvariantError naming shard/row/sample when a decoded row breaks the spec's invariants."""
    where = f"shard {shard} row {row.row_index} (sample_id {row.sample_id!r})"
    p, x = row.positions, row.input_ids
    if p.size and (int(p[0]) < 0 or int(p[-1]) >= len(x) or (np.diff(p) <= 0).any()):
        raise InvariantError(f"{where}: positions must be strictly increasing within [0, {len(x)})")
    if x.size and id_limit and (int(x.min()) < 0 or int(x.max()) >= id_limit):
        raise InvariantError(f"{where}: input_ids hold an id outside [0, {id_limit})")
    if kind == "class_logits":
        if row.class_logits is None or not np.isfinite(row.class_logits).all():
            raise InvariantError(f"{where}: class_logits missing or non-finite")
        return
    ids, lp, tail = row.ids, row.logprobs, row.tail
    if ids is None or lp is None or tail is None:
        raise InvariantError(f"{where}: ids/logprobs/tail missing")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= id_limit):
        raise InvariantError(f"{where}: a token id is outside [0, {id_limit})")
    if not np.isfinite(tail).all() or (tail < 0).any() or (tail > 1).any():
        raise InvariantError(f"{where}: tail mass outside [0, 1]")
    if kind == "topk":
        if not np.isfinite(lp).all() or (lp > 1e-6).any():
            raise InvariantError(f"{where}: a log-prob is > 0 or non-finite")
        if lp.shape[1] > 1 and (np.diff(lp, axis=1) > 1e-6).any():
            raise InvariantError(f"{where}: log-probs are not sorted descending within a position")
        if ids.shape[1] > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
            raise InvariantError(f"{where}: a token id repeats within one position")
        total = np.exp(lp.astype(np.float64)).sum(axis=1) + tail
        if lp.size and np.abs(total - 1).max() > _SUM_TOLERANCE:
            raise InvariantError(f"{where}: top-k + tail sums to {float(total.max()):.6f}, not 1")
    else:
        counts = row.counts if row.counts is not None else np.zeros((0, 0))
        if counts.size and (counts.sum(axis=1) != num_draws).any():
            t = int(np.flatnonzero(counts.sum(axis=1) != num_draws)[0])
            raise InvariantError(f"{where} position {int(p[t])}: counts sum to {int(counts[t].sum())}, "
                                 f"not num_draws={num_draws}")


def verify_cache(path: str | os.PathLike[str] | CacheReader, storage_options: dict[str, Any] | None = None, *,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Check every shard (size, sha256, schema, counts) and every row; return a summary or raise the first error."""
    reader = path if isinstance(path, CacheReader) else open_cache(path, storage_options)
    enc = reader.identity.encoding
    kind = enc.kind
    num_draws = getattr(enc, "num_draws", None)
    limit = reader.identity.id_limit
    seen: dict[str, str] = {}
    rows = 0
    for i, info in enumerate(reader.shard_infos):
        size = reader.storage.size(info.name) if reader.storage.exists(info.name) else -1
        if size == info.bytes:  # a size mismatch is reported (more precisely) by the reader below
            check_sha256(info, sha256_of(reader.storage, info.name), reader.storage.describe(info.name))
        for row in reader.iter_rows([i]):
            check_row(row, kind, limit, num_draws, info.name)
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
