"""The dump's output folder: which files are kdpipe's own, and repairing a cache before resuming it.

``--overwrite`` deletes only what the cache writer creates (SPEC §1's files and the writer's
temporary files), and checks that before anything is deleted. A rerun re-checks the shards of
finished units (a regular file of the recorded size and sha256) and has the writer redo the
units of any shard that is missing or damaged, so a resumed cache never keeps a broken shard.
"""

from __future__ import annotations

import hashlib
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cache_format import manifest as cm
from cache_format.manifest import ShardInfo

# The writer's temporary names: TMP_PREFIX, a uuid4 hex, "-", the final name (cache_format._files.temp_name).
_OWN_TEMP = re.compile(re.escape(cm.TMP_PREFIX) + r"[0-9a-f]{32}-.")


def is_own_temp(path: Path) -> bool:
    """A temporary file of kdpipe's writer (a shard or marker being written when the dump stopped)."""
    return bool(_OWN_TEMP.match(path.name)) and path.is_file() and not path.is_symlink()


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that kdpipe's cache writer did not create (never deleted by ``--overwrite``)."""
    own = {cm.MANIFEST_NAME, cm.INCOMPLETE_MARKER, cm.PROGRESS_JOURNAL}
    return sorted(p.name for p in folder.iterdir() if p.is_symlink() or not p.is_file()
                  or not (p.name in own or cm.SHARD_NAME_RE.match(p.name) or p.name.startswith(cm.TMP_PREFIX)
                          or cm.UNIT_MARKER_RE.fullmatch(p.name)))


def _recorded_shards(folder: Path) -> list[ShardInfo]:
    """The shards of the cache's completed units: from the manifest when finished, else from the unit markers
    (and an old journal). Unreadable markers are skipped here; the writer decides what they mean when it resumes."""
    if (folder / cm.MANIFEST_NAME).is_file():
        from cache_format import open_cache

        return list(open_cache(str(folder)).manifest.shards)
    from cache_format._cache_dir import read_done_units
    from cache_format._target import LocalTarget
    from cache_format.errors import CacheError

    target = LocalTarget(folder)
    try:  # sizes are checked below, with a message: every marked shard, present or not
        done = read_done_units(target, target.list_files(), check_sizes=False)
    except CacheError:
        return []
    return [s for rec in done.values() for s in rec.shards]


def _shard_problem(folder: Path, info: ShardInfo) -> str | None:
    """Why the shard file of ``info`` cannot be kept (missing, not a regular file, size, sha256), or None."""
    path = folder / info.name
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "is missing"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size != info.bytes:
        return f"is {st.st_size} bytes, its unit marker says {info.bytes}"
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return None if digest == info.sha256 else "has another sha256 than the one recorded (damaged in place)"


def repair_units(folder: Path, identity: Any, own: Callable[[int], bool] | None = None) -> list[str]:
    """Make a resume redo every completed unit whose shard is missing or damaged; one line per such shard.

    The writer redoes a unit whose shard file is gone, so a damaged shard is deleted. A finished
    cache is first reopened once by the writer (``mode="resume"``, then closed): that turns it into an
    unfinished cache with unit markers, since a finished one's manifest is trusted as it is. Every step is
    safe to interrupt: a rerun finds the same damage, or the unit already marked for redoing. ``own``:
    only units it accepts are checked (one of several workers touches its own units only).
    """
    damaged = [(info, why) for info in _recorded_shards(folder)
               if (own is None or own(info.unit)) and (why := _shard_problem(folder, info))]
    if not damaged:
        return []
    if (folder / cm.MANIFEST_NAME).is_file():
        from cache_format import CacheWriter

        CacheWriter(folder, identity, mode="resume").close()
    for info, _ in damaged:
        (folder / info.name).unlink(missing_ok=True)  # a symlink is removed, never its target
    return [f"shard {info.name} of unit {info.unit} {why}" for info, why in damaged]
