"""The writer's cache folder: preparing it (create / overwrite / resume) and the journal of completed units.

Only journaled units count as complete, so a restart after ``kill -9`` at any moment discards
partial work (temporary files, shards of unjournaled units) and redoes exactly the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cache_format._files import atomic_write, fsync_dir, write_synced
from cache_format.errors import CacheExistsError, IncompatibleCacheError, ManifestError
from cache_format.identity import CacheIdentity
from cache_format.manifest import (
    INCOMPLETE_MARKER,
    MANIFEST_NAME,
    PROGRESS_JOURNAL,
    SHARD_NAME_RE,
    TMP_PREFIX,
    ShardInfo,
    dumps_marker,
    now_iso,
    parse_manifest,
    parse_marker,
)

# Units durably complete, each with its shards in part order.
DoneUnits = dict[int, list[ShardInfo]]


def prepare_cache_dir(root: Path, identity: CacheIdentity, mode: str) -> tuple[DoneUnits, str]:
    """Make ``root`` ready for writing in ``mode``; returns (units already complete, the cache's created_at)."""
    created_at = now_iso()
    if root.exists() and not root.is_dir():
        raise CacheExistsError(f"{root} exists and is not a directory; choose another output path")
    entries = sorted(os.listdir(root)) if root.is_dir() else []
    if entries and mode == "create":
        raise CacheExistsError(f"{root} is not empty; pass mode='overwrite' (--overwrite) to replace the cache "
                               "there, or mode='resume' (kdpipe dump-teacher: rerun with the same settings) to continue an interrupted dump")
    if entries and mode == "resume":
        if MANIFEST_NAME in entries:
            return _reopen_finished(root, identity)
        return _resume_unfinished(root, identity, entries, created_at)
    if entries:  # overwrite
        _remove_previous(root, entries)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / INCOMPLETE_MARKER, dumps_marker(identity, created_at))
    atomic_write(root / PROGRESS_JOURNAL, b"")
    return {}, created_at


def _ours(name: str) -> bool:
    return (name in (MANIFEST_NAME, INCOMPLETE_MARKER, PROGRESS_JOURNAL) or name.startswith(TMP_PREFIX)
            or bool(SHARD_NAME_RE.match(name)))


def _remove_previous(root: Path, entries: list[str]) -> None:
    foreign = [e for e in entries if not _ours(e) or (root / e).is_dir()]
    if foreign:
        raise CacheExistsError(f"{root} holds {foreign[0]!r}, which is not part of a kdpipe cache; refusing "
                               "to overwrite a directory with foreign files — choose an empty or cache directory")
    # Manifest first: from here on no reader takes the directory for a complete cache.
    for e in sorted(entries, key=lambda e: e != MANIFEST_NAME):
        (root / e).unlink()
    fsync_dir(root)


def _check_identity(root: Path, stored: CacheIdentity, source: str, identity: CacheIdentity) -> None:
    diffs = stored.diff(identity)
    if diffs:
        raise IncompatibleCacheError(
            f"cannot resume into {root}: its identity ({source}) differs from this dump's "
            "(cache value != this run's value): " + "; ".join(diffs[:10])
            + " — use a new output directory, or --overwrite to replace it")


def _reopen_finished(root: Path, identity: CacheIdentity) -> tuple[DoneUnits, str]:
    """Resume into a finalized cache: its units stay, and it becomes unfinished until the next finalize()."""
    m = parse_manifest((root / MANIFEST_NAME).read_bytes(), str(root / MANIFEST_NAME))
    _check_identity(root, m.identity, MANIFEST_NAME, identity)
    done: DoneUnits = {u: [] for u in m.units}
    for s in m.shards:
        done.setdefault(s.unit, []).append(s)
    atomic_write(root / INCOMPLETE_MARKER, dumps_marker(identity, m.created_at))
    rewrite_journal(root, done)
    (root / MANIFEST_NAME).unlink()
    fsync_dir(root)
    return done, m.created_at


def _resume_unfinished(root: Path, identity: CacheIdentity, entries: list[str],
                       created_at: str) -> tuple[DoneUnits, str]:
    if INCOMPLETE_MARKER not in entries:
        raise CacheExistsError(f"{root} is not empty and holds no kdpipe cache (no {MANIFEST_NAME} or "
                               f"{INCOMPLETE_MARKER}); choose another directory")
    try:
        data = (root / INCOMPLETE_MARKER).read_bytes()
    except OSError as exc:
        raise ManifestError(f"{root / INCOMPLETE_MARKER} is unreadable ({exc}); the unfinished cache cannot be "
                            "resumed — restart with --overwrite") from None
    marker = parse_marker(data, str(root / INCOMPLETE_MARKER))
    _check_identity(root, marker.identity, INCOMPLETE_MARKER, identity)
    done = _read_journal(root)
    keep = {s.name for infos in done.values() for s in infos}
    for e in entries:
        if e.startswith(TMP_PREFIX) or (SHARD_NAME_RE.match(e) and e not in keep):
            (root / e).unlink()  # a shard whose unit was never journaled, or a half-written file
    rewrite_journal(root, done)
    fsync_dir(root)
    return done, marker.created_at or created_at


def _read_journal(root: Path) -> DoneUnits:
    path = root / PROGRESS_JOURNAL
    done: DoneUnits = {}
    if not path.exists():
        return done
    lines = path.read_bytes().split(b"\n")
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
            raise ManifestError(f"{path} line {i + 1} is corrupt; the unfinished cache cannot be resumed "
                                "safely — restart with --overwrite") from None
        # A journaled shard that vanished makes its unit incomplete: redo it.
        if all((root / s.name).is_file() and (root / s.name).stat().st_size == s.bytes for s in infos):
            done[unit] = infos
    return done


def _journal_line(unit: int, infos: list[ShardInfo]) -> str:
    return json.dumps({"unit": unit, "shards": [s.to_dict() for s in infos]})


def rewrite_journal(root: Path, done: DoneUnits) -> None:
    lines = [_journal_line(u, infos) for u, infos in sorted(done.items())]
    atomic_write(root / PROGRESS_JOURNAL, ("\n".join(lines) + "\n" if lines else "").encode())


def append_journal(root: Path, unit: int, infos: list[ShardInfo]) -> None:
    """Record ``unit`` as complete; durable when this returns."""
    write_synced(root / PROGRESS_JOURNAL, (_journal_line(unit, infos) + "\n").encode(), mode="ab")
