"""``finalize_cache()``: turn the unit markers of one or many writers into ``manifest.json``, written last.

Many workers (processes, nodes, a SLURM array) write disjoint units into one root, each unit
committed by its own marker (SPEC §4). Whoever finds every unit present — the last worker, or
``kdpipe cache finalize URL`` — writes the manifest; nothing is copied or merged. The manifest's
content depends only on what is in the root (shards sorted by (unit, part), ``created_at`` and
identity from the unfinished-cache marker, ``run.worker_index`` dropped), so two finalizers racing
write the same bytes, and finalizing a finished cache just returns its manifest.

Order: check every unit, remove leftovers (temporary files, shards no marker lists), write the
manifest, then remove the unit markers and, last, the unfinished-cache marker. A crash anywhere
leaves either an unfinished cache that a rerun finalizes, or a finished one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

from cache_format._cache_dir import DoneUnits, read_done_units
from cache_format._files import WRITER_SHARD_RE
from cache_format._target import WriteTarget, open_target
from cache_format.encodings.idset import DEFAULT_ID_CODING
from cache_format.errors import CacheNotFoundError, ChecksumMismatchError, ManifestError, MissingUnitsError
from cache_format.identity import CacheIdentity
from cache_format.manifest import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PROGRESS_JOURNAL,
    TMP_PREFIX,
    UNIT_MARKER_RE,
    build_manifest,
    dumps_manifest,
    parse_manifest,
    parse_marker,
)
from cache_format.shard import shard_encoding

# How many missing units an error names (the rest are counted).
_SHOW_MISSING = 8


def finalize_cache(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *,
                   verify: bool = False, allow_missing: bool = False) -> dict[str, Any]:
    """Write the manifest of the unfinished cache at ``url`` once every unit is present; returns the manifest.

    Units expected: ``0 .. identity.recipe["units"]["count"] - 1`` when the identity states a count
    (kdpipe dump-teacher does), else the units present. ``verify``: also check each shard's sha256
    (reads every byte; the sizes are always checked). Raises :class:`MissingUnitsError` naming the
    missing units and the workers that own them. ``allow_missing``: the units present are the cache
    (one worker's own cache, to be merged with the others' by :func:`cache_format.merge_caches`).
    """
    return finalize_target(open_target(url, storage_options), verify=verify, allow_missing=allow_missing)


def finalize_target(target: WriteTarget, *, verify: bool = False, allow_missing: bool = False) -> dict[str, Any]:
    entries = target.list_files()
    if MANIFEST_NAME in entries:
        return _finished(target, entries)
    if INCOMPLETE_MARKER not in entries:
        raise CacheNotFoundError(f"{target.describe()} holds no unfinished kdpipe cache (no {INCOMPLETE_MARKER} or "
                                 f"{MANIFEST_NAME}); check the path (and --endpoint-url)")
    marker = parse_marker(target.read(INCOMPLETE_MARKER, MAX_MANIFEST_BYTES), target.describe(INCOMPLETE_MARKER))
    done = read_done_units(target, entries)
    if verify:
        _check_sha256(target, done)
    if not allow_missing:
        _check_all_units(target, marker.identity, done)
    keep = {s.name for rec in done.values() for s in rec.shards}
    for name in sorted(entries):  # leftovers: no worker is mid-unit once every unit is complete
        if (name.startswith(TMP_PREFIX) or WRITER_SHARD_RE.fullmatch(name)) and name not in keep:
            target.delete(name)
    identity = _final_identity(marker.identity)
    shards = [s for rec in done.values() for s in rec.shards]
    manifest = build_manifest(identity, _shard_encoding(target, identity, done), shards, sorted(done),
                              created_at=marker.created_at)
    target.sync()
    target.put(MANIFEST_NAME, dumps_manifest(manifest).encode())
    _remove_markers(target, entries)
    return manifest


def _finished(target: WriteTarget, entries: dict[str, int | None]) -> dict[str, Any]:
    """A cache finalized already (possibly by another worker a moment ago): its markers go, its manifest stays."""
    m = parse_manifest(target.read(MANIFEST_NAME, MAX_MANIFEST_BYTES), target.describe(MANIFEST_NAME))
    _remove_markers(target, entries)
    return m.raw


def _remove_markers(target: WriteTarget, entries: dict[str, int | None]) -> None:
    for name in sorted(entries):
        if UNIT_MARKER_RE.fullmatch(name) or name == PROGRESS_JOURNAL:
            target.delete(name)
    if INCOMPLETE_MARKER in entries:
        target.delete(INCOMPLETE_MARKER)  # last: until now a reader sees an unfinished cache
    target.sync()


def _final_identity(identity: CacheIdentity) -> CacheIdentity:
    """The identity the manifest records: the run of whichever worker created the cache, minus its index."""
    run = {k: v for k, v in identity.run.items() if k != "worker_index"}
    return dataclasses.replace(identity, run=run)


def expected_units(identity: CacheIdentity) -> int | None:
    """``recipe.units.count``: how many units the dump has, when the identity says so."""
    units = identity.recipe.get("units")
    count = units.get("count") if isinstance(units, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def missing_units(identity: CacheIdentity, done: DoneUnits) -> list[int]:
    count = expected_units(identity)
    return [] if count is None else [u for u in range(count) if u not in done]


def _check_all_units(target: WriteTarget, identity: CacheIdentity, done: DoneUnits) -> None:
    missing = missing_units(identity, done)
    if not missing:
        return
    workers = identity.run.get("num_workers")
    shown = ", ".join(str(u) + (f" (worker {u % workers})" if isinstance(workers, int) and workers > 1 else "")
                      for u in missing[:_SHOW_MISSING])
    more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
    raise MissingUnitsError(
        f"{target.describe()}: {len(missing)} of {expected_units(identity)} units are not complete yet: unit "
        f"{shown}{more}; rerun those workers (each resumes its own units), then `kdpipe cache finalize "
        f"{target.describe()}`", missing, _totals(done))


def _totals(done: DoneUnits) -> dict[str, int]:
    shards = [s for rec in done.values() for s in rec.shards]
    return {"shards": len(shards), "units": len(done),
            **{key: sum(getattr(s, key) for s in shards) for key in ("rows", "tokens", "positions", "bytes")}}


def _check_sha256(target: WriteTarget, done: DoneUnits) -> None:
    for rec in done.values():
        for s in rec.shards:
            digest = hashlib.sha256()
            for chunk in target.storage.shard_chunks(s.name, s.bytes):
                digest.update(chunk)
            if digest.hexdigest() != s.sha256:
                raise ChecksumMismatchError(f"shard {target.describe(s.name)} of unit {s.unit}: sha256 differs from "
                                            f"its unit marker; delete {target.describe(s.name)} and rerun the worker "
                                            "that owns the unit (it redoes it), then finalize again")


def _shard_encoding(target: WriteTarget, identity: CacheIdentity, done: DoneUnits) -> dict[str, Any]:
    """The units' one shard encoding (markers record it; units of the old journal: read from a shard)."""
    from cache_format._shard_assembly import stored_id_coding

    encodings = {repr(sorted(rec.shard_encoding.items())): rec.shard_encoding
                 for rec in done.values() if rec.shard_encoding is not None}
    if len(encodings) > 1:
        raise ManifestError(f"{target.describe()}: unit markers disagree on the shard encoding "
                            f"({', '.join(sorted(encodings))[:300]}); the units were written by different settings "
                            "— re-dump into a new folder")
    if encodings:
        return next(iter(encodings.values()))
    first = next((rec.shards[0].name for _, rec in sorted(done.items()) if rec.shards), None)
    coding = (stored_id_coding(target, first) if first else None) or DEFAULT_ID_CODING
    return shard_encoding(identity, coding)
