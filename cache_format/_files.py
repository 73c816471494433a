"""Private file helpers of the writer, merge, copy and reader: temp names, fsync, atomic writes, hashing copies."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from cache_format.errors import SamePathError
from cache_format.manifest import TMP_PREFIX, ShardInfo
from cache_format.storage import (
    CHUNK_BYTES,
    Storage,
    is_remote,
    local_path,
    location,
    overlaps,
    sha256_mismatch,
)

# What ``temp_name`` makes, and the shard names kdpipe's writer gives: the only files (besides a cache's
# manifest and the shards it lists) that copy and merge treat as their own, to replace or remove.
TEMP_NAME_RE = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]{32}-[A-Za-z0-9._-]+")
WRITER_SHARD_RE = re.compile(r"shard-u[0-9]{9}-p[0-9]{4}\.arrow")


def is_leftover(name: str) -> bool:
    """A kdpipe temporary file, or a shard named the way kdpipe's writer names shards."""
    return bool(TEMP_NAME_RE.fullmatch(name) or WRITER_SHARD_RE.fullmatch(name))


def temp_name(name: str) -> str:
    """A unique temporary file name for ``name``: never referenced by a manifest, removed on resume."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, mode: str = "wb") -> None:
    """Write (or append, ``mode="ab"``) ``data`` and fsync it before returning."""
    with open(path, mode) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file, never a torn one."""
    tmp = path.parent / temp_name(path.name)
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def copy_hashing(src: BinaryIO, dst: BinaryIO | None = None) -> str:
    """sha256 (hex) of everything read from ``src``, copied to ``dst`` on the way when one is given."""
    digest = hashlib.sha256()
    while chunk := src.read(CHUNK_BYTES):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest()


def copy_shard_verified(source: Storage, info: ShardInfo, out_dir: Path) -> None:
    """Copy shard ``info`` of ``source`` into ``out_dir`` under its own name, only if its size and sha256 match.

    The bytes go to a temporary file (removed whatever happens) that is fsynced and renamed into
    place only after the check, so a damaged or substituted shard never appears under its name.
    """
    tmp = out_dir / temp_name(info.name)
    try:
        digest = hashlib.sha256()
        chunks = source.shard_chunks(info.name, info.bytes)  # type, size: refused here, before tmp exists
        with open(tmp, "xb") as dst:
            for chunk in chunks:
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if digest.hexdigest() != info.sha256:
            raise sha256_mismatch(source.describe(info.name), digest.hexdigest(), info.sha256)
        os.replace(tmp, out_dir / info.name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def refuse_overlap(action: str, dst: str | os.PathLike[str], dst_options: dict[str, Any] | None,
                   sources: list[tuple[str | os.PathLike[str], dict[str, Any] | None]]) -> None:
    """Refuse ``dst`` when it is a source, inside one, or holds one — in any spelling — before anything is touched."""
    target = location(dst, dst_options)
    for src, options in sources:
        place = location(src, options)
        same_dir = not is_remote(src) and not is_remote(dst) and _same_dir(local_path(src), local_path(dst))
        if same_dir or overlaps(place, target):
            raise SamePathError(f"cannot {action} {src} into {dst}: both name the same place, or one is inside the "
                                f"other ({place[2]} and {target[2]}); writing there would destroy the source cache "
                                "— choose a destination outside it")


def _same_dir(a: str, b: str) -> bool:
    """Same directory by inode (bind mounts, hard-linked paths), when both exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
