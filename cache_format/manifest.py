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

import numpy as np

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
# The journal of completed units written by kdpipe before unit markers (read on resume, never written).
PROGRESS_JOURNAL = ".kdpipe-progress.jsonl"
# One small file (object) per completed work unit: ``.kdpipe-unit-<unit:09d>.json`` (SPEC §4).
UNIT_MARKER_PREFIX = ".kdpipe-unit-"
UNIT_MARKER_RE = re.compile(re.escape(UNIT_MARKER_PREFIX) + r"([0-9]{9})\.json")
# Prefix of shards being written; never referenced by a manifest, removed on resume.
TMP_PREFIX = ".tmp-"
# A manifest of 64 MiB describes ~300k shards; anything larger is hostile or broken, and
# reading it whole into memory must stay cheap.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# Use with ``fullmatch``: ``$`` alone (``re.match``) also accepts a name ending in "\n".
SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.arrow$")
MAX_SHARD_NAME_CHARS = 255  # the usual file-name limit of local file systems
# Every count, size and total MUST fit in an IEEE double exactly, so any JSON reader (and any
# int64 sum of them) holds it without overflow or rounding.
MAX_COUNT = 2**53 - 1
# Deepest nesting of JSON arrays/objects a manifest may have; a writer's manifest nests about 8 deep
# (each merge of merges adds 3). Checked on the raw bytes before parsing, so no parser recurses deeply.
MAX_JSON_DEPTH = 64
PRODUCER = "kdpipe cache_format 0.1.0"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def shard_name(unit: int, part: int) -> str:
    """Shard file name: sorting names sorts by (unit, part), the order of a single-worker dump."""
    return f"shard-u{unit:09d}-p{part:04d}.arrow"


def unit_marker_name(unit: int) -> str:
    """The marker that makes ``unit`` complete once its shards are in place."""
    return f"{UNIT_MARKER_PREFIX}{unit:09d}.json"


def check_shard_name(name: Any, where: str) -> str:
    """Reject names that could escape the cache root or are not shard files."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{where}: shard name must be a non-empty string, got {name!r}")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in name or "/" in name \
            or "\\" in name or "://" in name:
        raise UnsafePathError(f"{where}: shard name {printable(repr(name))} is a path, not a file name inside the cache root; "
                              "a manifest may only name files in its own directory — this cache is unsafe to read")
    if len(name) > MAX_SHARD_NAME_CHARS or not SHARD_NAME_RE.fullmatch(name):
        raise UnsafePathError(f"{where}: shard name {printable(repr(name))} must match {SHARD_NAME_RE.pattern} "
                              f"(whole name, at most {MAX_SHARD_NAME_CHARS} characters)")
    return name


def printable(text: str, limit: int = 300) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\u202e``...) and cut to ``limit``.

    Every string that comes from a cache and reaches a terminal or an error message goes through
    this, so a shared cache cannot move the cursor, retitle the terminal or fake an ``ok`` line.
    """
    out = "".join(c if c.isprintable() else _escape(c) for c in text[: limit + 1])
    return out if len(text) <= limit else out[:limit] + "…"


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


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
        "identity_fingerprint": identity.fingerprint(format_version(shard_encoding)),  # the rule of that version
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
    d = load_json(data, source, fix)
    if not isinstance(d, dict):
        raise ManifestError(f"{source} must hold a JSON object; {fix}")
    if d.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise ManifestError(f"{source}: field 'format' is {printable(repr(d['format']))}, expected "
                            f"{FORMAT_NAME!r}; {fix}")
    created_at = d.get("created_at")
    return IncompleteMarker(identity=CacheIdentity.from_dict(d.get("identity"), source),
                            created_at=created_at if isinstance(created_at, str) else None)


def dumps_manifest(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=1, sort_keys=False, allow_nan=False) + "\n"


def json_too_deep(data: bytes, limit: int) -> bool:
    """True when JSON ``data`` nests arrays/objects more than ``limit`` deep (brackets inside strings skipped).

    Vectorised passes over the bytes, never a parser: a document nested 100,000 deep costs no recursion.
    Invalid JSON may give either answer; the parser reports it afterwards.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    # Removing "\\\\" pairs left to right, then '\\"', leaves exactly the quotes that open or close strings.
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    arr = np.frombuffer(data, np.uint8)
    depth = inside = 0
    for start in range(0, len(arr), _DEPTH_CHUNK):
        chunk = arr[start:start + _DEPTH_CHUNK]
        in_string = np.bitwise_xor.accumulate((chunk == ord('"')).view(np.uint8)) ^ inside
        inside = int(in_string[-1])
        delta = ((chunk == ord("[")) | (chunk == ord("{"))).view(np.int8) \
            - ((chunk == ord("]")) | (chunk == ord("}"))).view(np.int8)
        steps = delta[(delta != 0) & (in_string == 0)]
        if steps.size:
            levels = np.cumsum(steps, dtype=np.int64) + depth
            if int(levels.max()) > limit:
                return True
            depth = int(levels[-1])
    return False


_DEPTH_CHUNK = 4 * 1024 * 1024


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                # JSON readers disagree on which copy wins: two readers would see two different caches.
                raise ValueError(f"key {printable(repr(key), 80)} appears twice in one object")
            seen.add(key)
    return d


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_json(data: bytes, source: str, fix: str) -> Any:
    """Parse a manifest or marker: size-capped, depth-capped, UTF-8, no duplicate keys, no NaN/Infinity."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestTooLargeError(f"{source} is over the {MAX_MANIFEST_BYTES} byte cap; {fix}")
    if json_too_deep(data, MAX_JSON_DEPTH):
        raise ManifestError(f"{source} nests arrays/objects more than {MAX_JSON_DEPTH} levels deep; {fix}")
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{source} is unreadable: not valid UTF-8 JSON ({printable(str(exc))}); {fix}") from None


def _int(d: dict[str, Any], key: str, where: str, minimum: int = 0) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v <= MAX_COUNT:
        raise ManifestError(f"{where}.{key} must be an integer in [{minimum}, 2**53 - 1], got "
                            f"{printable(repr(v), 80)}")
    return v


def _str(d: dict[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise ManifestError(f"{where}.{key} must be a string, got {printable(repr(v), 80)}")
    return v


def parse_manifest(data: bytes, source: str) -> Manifest:
    """Parse and validate manifest bytes; every error names ``source`` and the field."""
    d = load_json(data, source, "the cache is corrupt or not a kdpipe cache — re-create or re-download it")
    return validate_manifest(d, source)


def validate_manifest(d: Any, source: str) -> Manifest:
    if not isinstance(d, dict):
        raise ManifestError(f"{source} must hold a JSON object, got {type(d).__name__}")
    fmt = d.get("format")
    if fmt != FORMAT_NAME:
        raise ManifestError(f"{source}: field 'format' is {printable(repr(fmt), 80)}, expected {FORMAT_NAME!r}; "
                            "not a kdpipe cache")
    version = _str(d, "format_version", source)
    m = re.fullmatch(r"([0-9]{1,9})\.([0-9]{1,9})", version)
    if not m:
        raise ManifestError(f"{source}: format_version {printable(repr(version), 80)} must look like 'MAJOR.MINOR'")
    if int(m.group(1)) != FORMAT_MAJOR:
        raise UnsupportedVersionError(f"{source}: format_version {version} has major version {m.group(1)}; this "
                                      f"library reads {FORMAT_MAJOR}.x — upgrade kdpipe to read this cache")
    created_at = _str(d, "created_at", source)
    producer = _str(d, "producer", source)
    identity = CacheIdentity.from_dict(d.get("identity"), f"{source}: identity")
    enc = d.get("shard_encoding")
    expected = shard_encoding(identity)
    if not isinstance(enc, dict) or any(enc.get(key) != value for key, value in expected.items()):
        raise ManifestError(f"{source}: shard_encoding {printable(repr(enc))} does not match the identity (expected "
                            f"{printable(repr(expected))}); the manifest was edited or is corrupt")
    check_encoding_version(enc, f"{source}: shard_encoding")
    shards = _parse_shards(d.get("shards"), source)
    units = d.get("units")
    if not isinstance(units, list) or not all(isinstance(u, int) and not isinstance(u, bool) and 0 <= u <= MAX_COUNT
                                              for u in units):
        raise ManifestError(f"{source}: field 'units' must be a list of integers in [0, 2**53 - 1]")
    if len(set(units)) != len(units):
        raise ManifestError(f"{source}: field 'units' lists a unit twice; the manifest was edited or is corrupt")
    _check_totals(d.get("totals"), shards, source)
    return Manifest(format_version=version, created_at=created_at, producer=producer, identity=identity,
                    shard_encoding=enc, shards=shards, units=sorted(units), raw=d)


def _parse_shards(raw_shards: Any, source: str) -> list[ShardInfo]:
    """The ``shards`` list: safe unique names, unique (unit, part), bounded counts, well-formed sha256."""
    if not isinstance(raw_shards, list):
        raise ManifestError(f"{source}: field 'shards' must be a list")
    shards: list[ShardInfo] = []
    names: dict[str, int] = {}
    slots: dict[tuple[int, int], int] = {}
    for i, s in enumerate(raw_shards):
        where = f"{source}: shards[{i}]"
        if not isinstance(s, dict):
            raise ManifestError(f"{where} must be an object")
        name = check_shard_name(s.get("name"), where)
        # Case-folded: on a case-insensitive file system "A.arrow" and "a.arrow" are one file read twice.
        if name.casefold() in names:
            raise ManifestError(f"{where}: shard {name} is listed twice (also shards[{names[name.casefold()]}]); "
                                "its rows would be read twice — the manifest was edited or is corrupt")
        names[name.casefold()] = i
        sha = _str(s, "sha256", where)
        if not _SHA256_RE.fullmatch(sha):
            raise ManifestError(f"{where}.sha256 must be 64 lowercase hex digits, got {printable(repr(sha), 80)}")
        info = ShardInfo(name=name, rows=_int(s, "rows", where), tokens=_int(s, "tokens", where),
                         positions=_int(s, "positions", where), bytes=_int(s, "bytes", where), sha256=sha,
                         unit=_int(s, "unit", where), part=_int(s, "part", where))
        if (info.unit, info.part) in slots:
            raise ManifestError(f"{where}: unit {info.unit} part {info.part} is also shards[{slots[info.unit, info.part]}]"
                                "; the same work is listed twice — the manifest was edited or is corrupt")
        slots[info.unit, info.part] = i
        shards.append(info)
    return shards


def _check_totals(totals: Any, shards: list[ShardInfo], source: str) -> None:
    """``totals`` must equal the sums over ``shards``, and every sum must stay within ``MAX_COUNT``."""
    if not isinstance(totals, dict):
        raise ManifestError(f"{source}: field 'totals' must be an object")
    for key, got in (("shards", len(shards)), ("rows", sum(s.rows for s in shards)),
                     ("tokens", sum(s.tokens for s in shards)), ("positions", sum(s.positions for s in shards)),
                     ("bytes", sum(s.bytes for s in shards))):
        want = _int(totals, key, f"{source}: totals")
        if got > MAX_COUNT:
            raise ManifestError(f"{source}: the shards' {key} add up to more than 2**53 - 1; the manifest is corrupt")
        if want != got:
            raise ManifestError(f"{source}: totals.{key} is {want} but the shards add up to {got}; "
                                "the manifest was edited or is corrupt")
