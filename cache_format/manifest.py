"""``manifest.json``: building it, and validating one before any shard is touched.

Validation is hand-written (the library depends on numpy and pyarrow only); the JSON
Schema in ``manifest.schema.json`` describes the same rules, and a test checks that both
accept and reject the same documents.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cache_format.errors import ManifestError, ManifestTooLargeError, UnsafePathError, UnsupportedVersionError
from cache_format.identity import CacheIdentity
from cache_format.shard import (
    FORMAT_MAJOR,
    FORMAT_NAME,
    FORMAT_VERSION,
    check_encoding_version,
    format_version,
    shard_encoding,
)

MANIFEST_NAME = "manifest.json"
# Written at creation, removed by finalize(): marks an unfinished cache and holds its identity.
INCOMPLETE_MARKER = ".kdpipe-incomplete.json"
# Append-only, fsynced journal of completed work units (one JSON object per line).
PROGRESS_JOURNAL = ".kdpipe-progress.jsonl"
# Prefix of shards being written; never referenced by a manifest, removed on resume.
TMP_PREFIX = ".tmp-"
# A manifest of 64 MiB describes ~300k shards; anything larger is hostile or broken, and
# reading it whole into memory must stay cheap.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.arrow$")
PRODUCER = "kdpipe cache_format 0.1.0"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def shard_name(unit: int, part: int) -> str:
    """Shard file name: sorting names sorts by (unit, part), the order of a single-worker dump."""
    return f"shard-u{unit:09d}-p{part:04d}.arrow"


def check_shard_name(name: Any, where: str) -> str:
    """Reject names that could escape the cache root or are not shard files."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{where}: shard name must be a non-empty string, got {name!r}")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in name or "/" in name \
            or "\\" in name or "://" in name:
        raise UnsafePathError(f"{where}: shard name {name!r} is a path, not a file name inside the cache root; "
                              "a manifest may only name files in its own directory — this cache is unsafe to read")
    if not SHARD_NAME_RE.match(name):
        raise UnsafePathError(f"{where}: shard name {name!r} must match {SHARD_NAME_RE.pattern}")
    return name


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it."""

    name: str
    rows: int
    tokens: int  # input tokens (sum of len(input_ids))
    positions: int  # target positions (stored distributions)
    bytes: int
    sha256: str
    unit: int
    part: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "part": self.part, "rows": self.rows, "tokens": self.tokens,
                "positions": self.positions, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class Manifest:
    """A validated manifest."""

    format_version: str
    created_at: str
    producer: str
    identity: CacheIdentity
    shard_encoding: dict[str, Any]
    shards: list[ShardInfo]
    units: list[int]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_positions(self) -> int:
        return sum(s.positions for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_manifest(identity: CacheIdentity, shard_encoding: dict[str, Any], shards: list[ShardInfo],
                   units: list[int], created_at: str | None = None) -> dict[str, Any]:
    shards = sorted(shards, key=lambda s: (s.unit, s.part))
    return {
        "format": FORMAT_NAME,
        "format_version": format_version(shard_encoding),
        "created_at": created_at or now_iso(),
        "producer": PRODUCER,
        "identity": identity.to_dict(),
        "identity_fingerprint": identity.fingerprint(),
        "shard_encoding": shard_encoding,
        "shards": [s.to_dict() for s in shards],
        "units": sorted(units),
        "totals": {"shards": len(shards), "rows": sum(s.rows for s in shards),
                   "tokens": sum(s.tokens for s in shards), "positions": sum(s.positions for s in shards),
                   "bytes": sum(s.bytes for s in shards)},
    }


@dataclass(frozen=True)
class IncompleteMarker:
    """The unfinished-cache marker: what a resumed dump must match, and when the dump began."""

    identity: CacheIdentity
    created_at: str | None


def dumps_marker(identity: CacheIdentity, created_at: str | None) -> bytes:
    marker = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_at": created_at,
              "identity": identity.to_dict(), "identity_fingerprint": identity.fingerprint()}
    return json.dumps(marker, indent=1).encode()


def parse_marker(data: bytes, source: str) -> IncompleteMarker:
    """Parse the marker written by ``dumps_marker``; every error names ``source`` and how to recover."""
    fix = "the unfinished cache cannot be resumed — restart the dump with --overwrite (mode='overwrite')"
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestTooLargeError(f"{source} is over the {MAX_MANIFEST_BYTES} byte cap; {fix}")
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{source} is unreadable ({exc}); {fix}") from None
    if not isinstance(d, dict):
        raise ManifestError(f"{source} must hold a JSON object; {fix}")
    if d.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise ManifestError(f"{source}: field 'format' is {d['format']!r}, expected {FORMAT_NAME!r}; {fix}")
    created_at = d.get("created_at")
    return IncompleteMarker(identity=CacheIdentity.from_dict(d.get("identity"), source),
                            created_at=created_at if isinstance(created_at, str) else None)


def dumps_manifest(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=1, sort_keys=False, allow_nan=False) + "\n"


def _int(d: dict[str, Any], key: str, where: str, minimum: int = 0) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ManifestError(f"{where}.{key} must be an integer >= {minimum}, got {v!r}")
    return v


def _str(d: dict[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise ManifestError(f"{where}.{key} must be a string, got {v!r}")
    return v


def parse_manifest(data: bytes, source: str) -> Manifest:
    """Parse and validate manifest bytes; every error names ``source`` and the field."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestTooLargeError(f"{source} is over the {MAX_MANIFEST_BYTES} byte cap; "
                                    "it is not a kdpipe manifest (or is corrupt)")
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{source} is not valid UTF-8 JSON ({exc}); the cache is corrupt — re-create or "
                            "re-download it") from None
    return validate_manifest(d, source)


def validate_manifest(d: Any, source: str) -> Manifest:
    if not isinstance(d, dict):
        raise ManifestError(f"{source} must hold a JSON object, got {type(d).__name__}")
    fmt = d.get("format")
    if fmt != FORMAT_NAME:
        raise ManifestError(f"{source}: field 'format' is {fmt!r}, expected {FORMAT_NAME!r}; not a kdpipe cache")
    version = _str(d, "format_version", source)
    m = re.match(r"^(\d+)\.(\d+)$", version)
    if not m:
        raise ManifestError(f"{source}: format_version {version!r} must look like 'MAJOR.MINOR'")
    if int(m.group(1)) != FORMAT_MAJOR:
        raise UnsupportedVersionError(f"{source}: format_version {version} has major version {m.group(1)}; this "
                                      f"library reads {FORMAT_MAJOR}.x — upgrade kdpipe to read this cache")
    created_at = _str(d, "created_at", source)
    producer = _str(d, "producer", source)
    identity = CacheIdentity.from_dict(d.get("identity"), f"{source}: identity")
    enc = d.get("shard_encoding")
    expected = shard_encoding(identity)
    if not isinstance(enc, dict) or any(enc.get(key) != value for key, value in expected.items()):
        raise ManifestError(f"{source}: shard_encoding {enc!r} does not match the identity (expected {expected}); "
                            "the manifest was edited or is corrupt")
    check_encoding_version(enc, f"{source}: shard_encoding")
    raw_shards = d.get("shards")
    if not isinstance(raw_shards, list):
        raise ManifestError(f"{source}: field 'shards' must be a list")
    shards: list[ShardInfo] = []
    seen: set[str] = set()
    for i, s in enumerate(raw_shards):
        where = f"{source}: shards[{i}]"
        if not isinstance(s, dict):
            raise ManifestError(f"{where} must be an object")
        name = check_shard_name(s.get("name"), where)
        if name in seen:
            raise ManifestError(f"{where}: shard {name} is listed twice")
        seen.add(name)
        sha = _str(s, "sha256", where)
        if not _SHA256_RE.match(sha):
            raise ManifestError(f"{where}.sha256 must be 64 lowercase hex digits, got {sha!r}")
        shards.append(ShardInfo(name=name, rows=_int(s, "rows", where), tokens=_int(s, "tokens", where),
                                positions=_int(s, "positions", where), bytes=_int(s, "bytes", where), sha256=sha,
                                unit=_int(s, "unit", where), part=_int(s, "part", where)))
    units = d.get("units")
    if not isinstance(units, list) or not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0
                                              for u in units):
        raise ManifestError(f"{source}: field 'units' must be a list of non-negative integers")
    totals = d.get("totals")
    if not isinstance(totals, dict):
        raise ManifestError(f"{source}: field 'totals' must be an object")
    for key, got in (("shards", len(shards)), ("rows", sum(s.rows for s in shards)),
                     ("tokens", sum(s.tokens for s in shards)), ("positions", sum(s.positions for s in shards)),
                     ("bytes", sum(s.bytes for s in shards))):
        if _int(totals, key, f"{source}: totals") != got:
            raise ManifestError(f"{source}: totals.{key} is {totals[key]} but the shards add up to {got}; "
                                "the manifest was edited or is corrupt")
    return Manifest(format_version=version, created_at=created_at, producer=producer, identity=identity,
                    shard_encoding=enc, shards=shards, units=sorted(units), raw=d)
