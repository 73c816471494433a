"""Generators of bad caches: each takes a good cache directory and breaks it in one specific way.

``CASES`` maps a case name to (generator, the call that must fail, the error class it must raise,
a regex the one-line message must match). Used by ``test_bad_caches.py``; also handy by hand:
``python tests/cache_format/bad_caches.py OUT_DIR`` writes every case into OUT_DIR/<case>/.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from cache_format import ChecksumMismatchError, IncompleteCacheError
from cache_format.errors import (
    CountMismatchError,
    DuplicateError,
    InvariantError,
    ManifestError,
    ManifestTooLargeError,
    ShardCorruptError,
    ShardTruncatedError,
    UnsafePathError,
    UnsupportedVersionError,
)
from cache_format.manifest import INCOMPLETE_MARKER, MANIFEST_NAME, MAX_MANIFEST_BYTES

SHARD0 = "shard-u000000000-p0000.arrow"


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / MANIFEST_NAME).read_text())


def _save(root: Path, m: dict[str, Any]) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(m, indent=1))


def truncated_shard(root: Path) -> None:
    data = (root / SHARD0).read_bytes()
    (root / SHARD0).write_bytes(data[: len(data) // 2])


def flipped_byte(root: Path) -> None:
    data = bytearray((root / SHARD0).read_bytes())
    data[len(data) // 2] ^= 0x40
    (root / SHARD0).write_bytes(bytes(data))


def wrong_checksum(root: Path) -> None:
    m = _manifest(root)
    m["shards"][0]["sha256"] = "0" * 64
    _save(root, m)


def unknown_major_version(root: Path) -> None:
    m = _manifest(root)
    m["format_version"] = "2.0"
    _save(root, m)


def shard_version_from_the_future(root: Path) -> None:
    """The shard itself (Arrow schema metadata) says 2.0; the manifest is consistent with the file."""
    table = pa.ipc.open_file(pa.memory_map(str(root / SHARD0))).read_all()
    meta = dict(table.schema.metadata)
    meta[b"kdpipe.format_version"] = b"2.0"
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    data = sink.getvalue().to_pybytes()
    (root / SHARD0).write_bytes(data)
    import hashlib

    m = _manifest(root)
    m["shards"][0]["bytes"] = len(data)
    m["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    _save(root, m)


def dotdot_shard_name(root: Path) -> None:
    m = _manifest(root)
    m["shards"][0]["name"] = "../outside.arrow"
    _save(root, m)


def absolute_shard_name(root: Path) -> None:
    m = _manifest(root)
    m["shards"][0]["name"] = "/etc/passwd.arrow"
    _save(root, m)


def oversized_manifest(root: Path) -> None:
    text = (root / MANIFEST_NAME).read_text()
    (root / MANIFEST_NAME).write_text(text + " " * (MAX_MANIFEST_BYTES + 1 - len(text.encode())))


def manifest_not_json(root: Path) -> None:
    (root / MANIFEST_NAME).write_text('{"format": "kdpipe-logit-cache", ')


def manifest_missing_field(root: Path) -> None:
    m = _manifest(root)
    del m["shards"][0]["rows"]
    _save(root, m)


def row_count_lies(root: Path) -> None:
    m = _manifest(root)
    m["shards"][0]["rows"] += 1
    m["totals"]["rows"] += 1
    _save(root, m)


def token_count_lies(root: Path) -> None:
    m = _manifest(root)
    m["shards"][0]["positions"] -= 1
    m["totals"]["positions"] -= 1
    _save(root, m)


def ids_beyond_vocab(root: Path) -> None:
    """The shards hold ids up to ~1000 but the manifest claims a 10-token vocabulary."""
    m = _manifest(root)
    m["identity"]["tokenizer"]["vocab_size"] = 10
    m["identity"]["tokenizer"]["model_vocab_size"] = 10
    _save(root, m)


def missing_shard(root: Path) -> None:
    (root / SHARD0).unlink()


def not_arrow(root: Path) -> None:
    """Garbage of the right size and checksum: only the Arrow reader can tell."""
    import hashlib

    size = (root / SHARD0).stat().st_size
    data = b"x" * size
    (root / SHARD0).write_bytes(data)
    m = _manifest(root)
    m["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    _save(root, m)


def unfinished(root: Path) -> None:
    (root / MANIFEST_NAME).rename(root / INCOMPLETE_MARKER)


def duplicate_sample_ids(root: Path) -> None:
    """Shard 1 is a copy of shard 0 (consistent checksums): the same sample ids twice."""
    m = _manifest(root)
    name1 = m["shards"][1]["name"]
    (root / name1).write_bytes((root / SHARD0).read_bytes())
    s0, s1 = m["shards"][0], m["shards"][1]
    for key in ("rows", "tokens", "positions", "bytes", "sha256"):
        s1[key] = s0[key]
    for key in ("rows", "tokens", "positions", "bytes"):
        m["totals"][key] = sum(s[key] for s in m["shards"])
    _save(root, m)


def shard_from_another_cache(root: Path) -> None:
    """Shard 0 replaced by a consistent shard of a k=4 cache (manifest sizes and checksums updated)."""
    import hashlib
    import tempfile

    from helpers.cache import write_topk_cache

    with tempfile.TemporaryDirectory() as tmp:
        other = write_topk_cache(Path(tmp) / "other", units=1, k=4)
        data = (other / SHARD0).read_bytes()
        m_other = _manifest(other)
    (root / SHARD0).write_bytes(data)
    m = _manifest(root)
    for key in ("rows", "tokens", "positions", "bytes", "sha256"):
        m["shards"][0][key] = m_other["shards"][0][key]
    m["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    for key in ("rows", "tokens", "positions", "bytes"):
        m["totals"][key] = sum(s[key] for s in m["shards"])
    _save(root, m)


# name -> (generator, operation that must fail, error class, message regex)
CASES: dict[str, tuple[Callable[[Path], None], str, type[Exception], str]] = {
    "truncated_shard": (truncated_shard, "read", ShardTruncatedError, r"shard-u000000000-p0000\.arrow.* bytes"),
    "flipped_byte": (flipped_byte, "verify", ChecksumMismatchError, r"sha256"),
    "wrong_checksum": (wrong_checksum, "verify", ChecksumMismatchError, r"shard-u000000000-p0000.*sha256"),
    "unknown_major_version": (unknown_major_version, "open", UnsupportedVersionError, r"major version 2"),
    "shard_version_from_the_future": (shard_version_from_the_future, "read", UnsupportedVersionError,
                                      r"shard-u000000000.*'2\.0'"),
    "dotdot_shard_name": (dotdot_shard_name, "open", UnsafePathError, r"shards\[0\].*'\.\./outside\.arrow'"),
    "absolute_shard_name": (absolute_shard_name, "open", UnsafePathError, r"'/etc/passwd\.arrow'"),
    "oversized_manifest": (oversized_manifest, "open", ManifestTooLargeError, r"byte cap"),
    "manifest_not_json": (manifest_not_json, "open", ManifestError, r"not valid UTF-8 JSON"),
    "manifest_missing_field": (manifest_missing_field, "open", ManifestError, r"shards\[0\]\.rows"),
    "row_count_lies": (row_count_lies, "read", CountMismatchError, r"holds 4 rows but the manifest says 5"),
    "token_count_lies": (token_count_lies, "read", CountMismatchError, r"positions but the manifest says"),
    "ids_beyond_vocab": (ids_beyond_vocab, "read", InvariantError, r"row 0 .*sample_id 'u0-r0'.*>= vocab size 10"),
    "missing_shard": (missing_shard, "read", ShardCorruptError, r"listed in the manifest but missing"),
    "not_arrow": (not_arrow, "read", ShardCorruptError, r"not a readable Arrow IPC file"),
    "unfinished": (unfinished, "open", IncompleteCacheError, r"unfinished"),
    "shard_from_another_cache": (shard_from_another_cache, "read", ShardCorruptError, r"'k': 4.*belongs to another"),
    "duplicate_sample_ids": (duplicate_sample_ids, "verify", DuplicateError, r"sample_id 'u0-r0'|byte-identical"),
}


if __name__ == "__main__":  # write every case for manual inspection
    import shutil

    from helpers.cache import write_topk_cache

    out = Path(sys.argv[1])
    for name, (gen, *_rest) in CASES.items():
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        gen(write_topk_cache(target, units=2))
        print(target)
