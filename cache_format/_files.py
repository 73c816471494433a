"""Private file helpers of the writer, merge, copy and reader: temp names, fsync, atomic writes, hashing copies."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO

from cache_format.manifest import TMP_PREFIX

# Bytes per read when hashing or copying a shard: large enough for (object-store) throughput, small for memory.
CHUNK_BYTES = 8 * 1024 * 1024


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
