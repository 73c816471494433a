"""The writer's cache root: preparing it (create / overwrite / resume / shared) and the unit markers.

A unit is complete exactly when its marker ``.kdpipe-unit-<unit:09d>.json`` exists and every shard
it lists is there with the recorded size (SPEC §4). Markers are small files (objects) of their
own, so several workers can complete units in one root at once and an object store needs no
append. A resumed writer never deletes anything: its unfinished units are simply written again
under the same names, and leftovers (temporary files, shards without a marker) are removed by
``finalize`` only — another worker may be writing them right now.

Caches started by the version before markers kept an append-only journal
(``.kdpipe-progress.jsonl``); resuming one converts its valid entries to markers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cache_format._files import WRITER_SHARD_RE
from cache_format._target import WriteTarget
from cache_format.errors import CacheExistsError, CacheNotFoundError, IncompatibleCacheError, ManifestError
from cache_format.identity import CacheIdentity
from cache_format.manifest import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PROGRESS_JOURNAL,
    TMP_PREFIX,
    UNIT_MARKER_RE,
    ShardInfo,
    dumps_marker,
    load_json,
    now_iso,
    parse_manifest,
    parse_marker,
    unit_marker_name,
)

MODES = ("create", "overwrite", "resume", "shared")


@dataclass(frozen=True)
class UnitRecord:
    """A completed unit: its shards in part order, and the shard encoding they were written with."""

    shards: list[ShardInfo]
    shard_encoding: dict[str, Any] | None  # None: a unit of the old journal (read from a shard when needed)


# Units durably complete.
DoneUnits = dict[int, UnitRecord]


def is_writer_file(name: str) -> bool:
    """A file kdpipe's writer creates in a cache root (what ``overwrite`` may delete)."""
    return (name in (MANIFEST_NAME, INCOMPLETE_MARKER, PROGRESS_JOURNAL) or name.startswith(TMP_PREFIX)
            or bool(UNIT_MARKER_RE.fullmatch(name)) or bool(WRITER_SHARD_RE.fullmatch(name)))


def prepare_cache_dir(target: WriteTarget, identity: CacheIdentity, mode: str) -> DoneUnits:
    """Make the root ready for writing in ``mode``; returns the units already complete.

    The cache's ``created_at`` is kept in the unfinished-cache marker, where the finalizer reads it.

    ``shared``: one of several workers writing into one root. The unfinished-cache marker is
    written when absent; when present, its identity must equal this worker's. Nothing is deleted.
    """
    entries = target.list_files()
    if entries and mode == "create":
        raise CacheExistsError(f"{target.describe()} is not empty; pass mode='overwrite' (--overwrite) to replace the "
                               "cache there, or mode='resume' (kdpipe dump-teacher: rerun with the same settings) to "
                               "continue an interrupted dump")
    if mode in ("resume", "shared") and (MANIFEST_NAME in entries or INCOMPLETE_MARKER in entries):
        if MANIFEST_NAME in entries:
            return _reopen_finished(target, identity)
        return _resume_unfinished(target, identity, entries)
    if entries and mode == "resume":
        raise CacheExistsError(f"{target.describe()} is not empty and holds no kdpipe cache (no {MANIFEST_NAME} or "
                               f"{INCOMPLETE_MARKER}); choose another directory")
    if entries and mode == "shared":
        _refuse_foreign(target, entries, "write into")  # kdpipe's leftovers stay: finalize removes them
    elif entries:  # overwrite
        _remove_previous(target, entries)
    target.makedirs()
    target.put(INCOMPLETE_MARKER, dumps_marker(identity, now_iso()))
    return {}


def _refuse_foreign(target: WriteTarget, entries: dict[str, int | None], action: str) -> None:
    foreign = sorted(e for e, size in entries.items() if size is None or not is_writer_file(e))
    if foreign:
        raise CacheExistsError(f"{target.describe()} holds {foreign[0]!r}, which is not part of a kdpipe cache; "
                               f"refusing to {action} a folder with foreign files — choose an empty or cache folder")


def _remove_previous(target: WriteTarget, entries: dict[str, int | None]) -> None:
    _refuse_foreign(target, entries, "overwrite")
    # Manifest first: from here on no reader takes the root for a complete cache.
    for e in sorted(entries, key=lambda e: e != MANIFEST_NAME):
        target.delete(e)
    target.sync()


def _check_identity(target: WriteTarget, stored: CacheIdentity, source: str, identity: CacheIdentity) -> None:
    diffs = stored.diff(identity)
    if diffs:
        raise IncompatibleCacheError(
            f"cannot resume into {target.describe()}: its identity ({source}) differs from this dump's "
            "(cache value != this run's value): " + "; ".join(diffs[:10])
            + " — use a new output directory, or --overwrite to replace it")


def _reopen_finished(target: WriteTarget, identity: CacheIdentity) -> DoneUnits:
    """Resume into a finalized cache: its units become markers, and it is unfinished until the next finalize.

    Order: the incomplete marker, every unit's marker, then the manifest goes. A crash in between leaves
    the manifest in place, and the next resume (or finalize) starts over from it.
    """
    m = parse_manifest(target.read(MANIFEST_NAME, MAX_MANIFEST_BYTES), target.describe(MANIFEST_NAME))
    _check_identity(target, m.identity, MANIFEST_NAME, identity)
    done: DoneUnits = {u: UnitRecord([], m.shard_encoding) for u in m.units}
    for s in sorted(m.shards, key=lambda s: (s.unit, s.part)):
        done.setdefault(s.unit, UnitRecord([], m.shard_encoding)).shards.append(s)
    target.put(INCOMPLETE_MARKER, dumps_marker(m.identity, m.created_at))
    for u, rec in sorted(done.items()):
        write_unit_marker(target, u, rec)
    target.delete(MANIFEST_NAME)
    target.sync()
    return done


def _resume_unfinished(target: WriteTarget, identity: CacheIdentity, entries: dict[str, int | None]) -> DoneUnits:
    try:
        data = target.read(INCOMPLETE_MARKER, MAX_MANIFEST_BYTES)
    except (OSError, ManifestError) as exc:
        raise ManifestError(f"{target.describe(INCOMPLETE_MARKER)} is unreadable ({exc}); the unfinished cache cannot "
                            "be resumed — restart with --overwrite") from None
    marker = parse_marker(data, target.describe(INCOMPLETE_MARKER))
    _check_identity(target, marker.identity, INCOMPLETE_MARKER, identity)
    done = read_done_units(target, entries)
    if PROGRESS_JOURNAL in entries:  # a cache of the previous version: its units become markers
        for u, rec in sorted(done.items()):
            if rec.shard_encoding is None:
                write_unit_marker(target, u, rec)
        target.delete(PROGRESS_JOURNAL)
    target.sync()
    return done


# ------------------------------------------------------------ unit markers


def dumps_unit_marker(unit: int, rec: UnitRecord) -> bytes:
    return json.dumps({"unit": unit, "shards": [s.to_dict() for s in rec.shards],
                       "shard_encoding": rec.shard_encoding}, indent=1).encode()


def write_unit_marker(target: WriteTarget, unit: int, rec: UnitRecord) -> None:
    """The commit point of ``unit``: written after its shards are in place under their final names."""
    target.put(unit_marker_name(unit), dumps_unit_marker(unit, rec))


def parse_unit_marker(data: bytes, source: str) -> tuple[int, UnitRecord]:
    fix = "delete that marker file (its unit is then dumped again) or restart the dump with --overwrite"
    d = load_json(data, source, fix)
    try:
        unit = d["unit"]
        if not isinstance(unit, int) or isinstance(unit, bool) or unit < 0:
            raise TypeError("unit")
        shards = [ShardInfo(**s) for s in d["shards"]]
        enc = d.get("shard_encoding")
        if enc is not None and not isinstance(enc, dict):
            raise TypeError("shard_encoding")
    except (KeyError, TypeError, ValueError):
        raise ManifestError(f"{source} is not a valid unit marker; {fix}") from None
    return unit, UnitRecord(shards, enc)


def _complete(rec: UnitRecord, entries: dict[str, int | None]) -> bool:
    """Every shard of the unit is there with its recorded size (a vanished or torn shard: redo the unit)."""
    return all(entries.get(s.name) == s.bytes for s in rec.shards)


def read_done_units(target: WriteTarget, entries: dict[str, int | None], check_sizes: bool = True) -> DoneUnits:
    """Complete units: from the markers, then from an old journal for units without a marker.

    ``check_sizes=False``: every marked unit, whether its shards are there or not."""
    done: DoneUnits = {}
    for name in sorted(entries):
        m = UNIT_MARKER_RE.fullmatch(name)
        if not m or entries[name] is None:
            continue
        try:
            data = target.read(name, MAX_MANIFEST_BYTES)
        except (FileNotFoundError, CacheNotFoundError):
            continue  # removed meanwhile (a finalize in another process)
        unit, rec = parse_unit_marker(data, target.describe(name))
        if unit == int(m.group(1)) and (not check_sizes or _complete(rec, entries)):
            done[unit] = rec
    if PROGRESS_JOURNAL in entries:
        for unit, rec in _read_journal(target).items():
            if unit not in done and (not check_sizes or _complete(rec, entries)):
                done[unit] = rec
    return done


def _read_journal(target: WriteTarget) -> DoneUnits:
    done: DoneUnits = {}
    lines = target.read(PROGRESS_JOURNAL, MAX_MANIFEST_BYTES).split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            infos = [ShardInfo(**s) for s in rec["shards"]]
            unit = int(rec["unit"])
        except (ValueError, KeyError, TypeError):
            if i >= len(lines) - 2:
                break  # a torn final line: its unit was not recorded, so it is simply redone
            raise ManifestError(f"{target.describe(PROGRESS_JOURNAL)} line {i + 1} is corrupt; the unfinished cache "
                                "cannot be resumed safely — restart with --overwrite") from None
        done[unit] = UnitRecord(infos, None)
    return done
