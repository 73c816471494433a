"""Untrusted caches, files and manifests (SPEC §1.1, §2): links, pipes, devices, hostile manifests, escapes.

Every case must end in one clear CacheError naming the file, quickly: the ones that used to hang
run under an alarm, so a regression fails instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cache_format import ChecksumMismatchError, copy_cache, open_cache, read_identity, verify_cache
from cache_format.errors import (
    ManifestError,
    ShardCorruptError,
    ShardTruncatedError,
    UnsafeFileError,
    UnsafePathError,
)
from cache_format.manifest import MANIFEST_NAME, json_too_deep, printable
from cache_format.storage import Storage
from helpers.cache import write_topk_cache
from pipeline.cli_cache import cache_app

SHARD0 = "shard-u000000000-p0000.arrow"
# Terminal escapes a hostile cache could carry: retitle, clear screen, rewrite the line to read "ok".
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\r\x1b[Kok \u202e"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_topk_cache(tmp_path_factory.mktemp("good") / "c", units=2)


@pytest.fixture
def cache(good: Path, tmp_path: Path) -> Path:
    root = tmp_path / "c"
    shutil.copytree(good, root)
    return root


@contextlib.contextmanager
def deadline(seconds: int = 20) -> Iterator[None]:
    """Fail (instead of hanging forever) when the block blocks on a FIFO or loops on /dev/zero."""
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s: the reader blocked or looped")

    old = signal.signal(signal.SIGALRM, expire)
    outer = signal.alarm(seconds)  # pytest-timeout's own alarm, if any: given back below
    start = time.monotonic()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.alarm(max(1, outer - int(time.monotonic() - start)))


def edit_manifest(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    m = json.loads((root / MANIFEST_NAME).read_text())
    change(m)
    (root / MANIFEST_NAME).write_text(json.dumps(m))


def set_shard0_bytes(root: Path, size: int) -> None:
    def change(m: dict[str, Any]) -> None:
        m["shards"][0]["bytes"] = size
        m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    edit_manifest(root, change)


def every_reader(root: Path, tmp_path: Path) -> Iterator[Callable[[], object]]:
    """open+read, verify, read with checksums, copy: each must refuse the cache."""
    yield lambda: list(open_cache(root).iter_rows())
    yield lambda: verify_cache(root)
    yield lambda: list(open_cache(root, verify_checksums=True).iter_rows())
    yield lambda: copy_cache(root, str(tmp_path / "copy"))


def assert_all_refuse(root: Path, tmp_path: Path, error: type[Exception], pattern: str) -> None:
    for run in every_reader(root, tmp_path):
        with deadline(), pytest.raises(error, match=pattern) as info:
            run()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_symlinked_shard_is_refused_wherever_it_points(cache: Path, tmp_path: Path, where: str) -> None:
    # The link points at the shard's own bytes, so size and sha256 would both pass: only the link rule stops it.
    target = tmp_path / "elsewhere.arrow" if where == "outside" else cache / "real-bytes.bin"
    (cache / SHARD0).rename(target)
    (cache / SHARD0).symlink_to(target)
    assert_all_refuse(cache, tmp_path, UnsafeFileError, rf"{SHARD0} is a symbolic link")


@pytest.mark.parametrize("size", [0, 10**9])
def test_shard_linked_to_dev_zero_ends_at_once(cache: Path, tmp_path: Path, size: int) -> None:
    set_shard0_bytes(cache, size)
    (cache / SHARD0).unlink()
    (cache / SHARD0).symlink_to("/dev/zero")
    assert_all_refuse(cache, tmp_path, UnsafeFileError, r"symbolic link")
    assert not (tmp_path / "copy" / SHARD0).exists()


def test_fifo_shard_never_blocks(cache: Path, tmp_path: Path) -> None:
    (cache / SHARD0).unlink()
    os.mkfifo(cache / SHARD0)
    assert_all_refuse(cache, tmp_path, UnsafeFileError, rf"{SHARD0} is a named pipe \(FIFO\)")


def test_fifo_manifest_never_blocks(cache: Path) -> None:
    (cache / MANIFEST_NAME).unlink()
    os.mkfifo(cache / MANIFEST_NAME)
    for run in (lambda: open_cache(cache), lambda: read_identity(cache), lambda: verify_cache(cache)):
        with deadline(), pytest.raises(UnsafeFileError, match=r"manifest\.json is a named pipe"):
            run()


def test_symlinked_manifest_and_directory_shard_are_refused(cache: Path, tmp_path: Path) -> None:
    (cache / MANIFEST_NAME).rename(tmp_path / "m.json")
    (cache / MANIFEST_NAME).symlink_to(tmp_path / "m.json")
    with pytest.raises(UnsafeFileError, match=r"manifest\.json is a symbolic link"):
        open_cache(cache)
    (cache / MANIFEST_NAME).unlink()
    (tmp_path / "m.json").rename(cache / MANIFEST_NAME)
    (cache / SHARD0).unlink()
    (cache / SHARD0).mkdir()
    assert_all_refuse(cache, tmp_path, UnsafeFileError, r"is a directory")


def test_a_link_swapped_in_after_lstat_still_fails_to_open(cache: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """lstat lies (as if the file were swapped between check and open): O_NOFOLLOW and fstat still refuse."""
    os.mkfifo(tmp_path / "pipe")
    (cache / SHARD0).unlink()
    (cache / SHARD0).symlink_to(tmp_path / "pipe")
    regular = os.stat(cache / MANIFEST_NAME)
    monkeypatch.setattr(os, "lstat", lambda path, *a, **k: regular)
    with deadline(), pytest.raises(UnsafeFileError, match="symbolic link"):
        list(open_cache(cache).iter_rows())
    (cache / SHARD0).unlink()
    os.mkfifo(cache / SHARD0)  # opened with O_NONBLOCK: returns at once, then fstat sees the FIFO
    with deadline(), pytest.raises(UnsafeFileError, match=r"named pipe"):
        list(open_cache(cache).iter_rows())


def test_reads_stop_at_the_manifest_byte_count(cache: Path) -> None:
    size = (cache / SHARD0).stat().st_size
    storage = Storage(cache)
    chunks = storage.shard_chunks(SHARD0, size)  # checked and opened: size matches
    with open(cache / SHARD0, "ab") as fh:
        fh.write(b"x" * 4096)  # ...and the file grows before it is read
    with pytest.raises(ShardTruncatedError, match="changed size while being read"):
        list(chunks)
    with pytest.raises(ShardTruncatedError, match=rf"{size + 4096} bytes but the manifest says {size}"):
        storage.open_shard(SHARD0, size)


def test_checksum_is_checked_on_the_bytes_that_are_decoded(cache: Path) -> None:
    data = bytearray((cache / SHARD0).read_bytes())
    data[len(data) // 2] ^= 1
    (cache / SHARD0).write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=SHARD0):
        list(open_cache(cache, verify_checksums=True).iter_rows())
    info = open_cache(cache).manifest.shards[0]
    good = Storage(cache).read_shard(info.name, info.bytes, None)
    assert hashlib.sha256(good).hexdigest() != info.sha256


def test_missing_shard_keeps_its_message(cache: Path) -> None:
    (cache / SHARD0).unlink()
    with pytest.raises(ShardCorruptError, match="listed in the manifest but missing"):
        list(open_cache(cache).iter_rows())


# ------------------------------------------------------------ hostile manifests


def test_manifest_nested_100000_deep_is_a_manifest_error(cache: Path) -> None:
    (cache / MANIFEST_NAME).write_bytes(b'{"format": "kdpipe-logit-cache", "x": ' + b"[" * 100_000 + b"]" * 100_000
                                        + b"}")
    for run in (lambda: open_cache(cache), lambda: read_identity(cache)):
        with pytest.raises(ManifestError, match="more than 64 levels deep"):
            run()


def test_depth_scan_skips_brackets_inside_strings() -> None:
    doc = json.dumps({"a": "[[[[[[" * 50, "b": [[["]]]]"]]]}).encode()
    assert not json_too_deep(doc, 4) and json_too_deep(doc, 3)
    assert json_too_deep(b"[" * 65 + b"]" * 65, 64) and not json_too_deep(b"[" * 64 + b"]" * 64, 64)


@pytest.mark.parametrize(("change", "pattern"), [
    (lambda m: m["shards"][0].update(name=SHARD0 + "\n"), r"must match"),
    (lambda m: m["shards"][0].update(name="\x1b[2J.arrow"), r"\\x1b\[2J"),
    (lambda m: m["shards"][0].update(name="a" * 300 + ".arrow"), r"at most 255"),
    (lambda m: m["shards"][0].update(name=".hidden.arrow"), r"must match"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), r"listed twice"),
    (lambda m: m["shards"][1].update(name=m["shards"][0]["name"].upper().replace(".ARROW", ".arrow")),
     r"listed twice"),
    (lambda m: m["shards"][1].update(unit=m["shards"][0]["unit"]), r"unit 0 part 0 is also shards\[0\]"),
    (lambda m: m["shards"][0].update(rows=2**53), r"shards\[0\]\.rows must be an integer in \[0, 2\*\*53 - 1\]"),
    (lambda m: m["shards"][0].update(bytes=1e9), r"shards\[0\]\.bytes must be an integer"),
    (lambda m: m.update(units=[0, 0, 1]), r"lists a unit twice"),
    (lambda m: m.update(format_version="1.0\n"), r"MAJOR\.MINOR"),
    (lambda m: m.update(format_version="1" * 5000 + ".0"), r"MAJOR\.MINOR"),
])
def test_hostile_manifest_fields_are_refused(cache: Path, change: Callable[[dict[str, Any]], None],
                                             pattern: str) -> None:
    edit_manifest(cache, change)
    with pytest.raises(ManifestError, match=pattern) as info:
        open_cache(cache)
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)


def test_duplicate_keys_and_nan_are_refused(cache: Path) -> None:
    text = (cache / MANIFEST_NAME).read_text()
    (cache / MANIFEST_NAME).write_text(text.replace('"producer":', '"producer": "x", "producer":', 1))
    with pytest.raises(ManifestError, match="'producer' appears twice"):
        open_cache(cache)
    (cache / MANIFEST_NAME).write_text(text.replace('"temperature": 1.0', '"temperature": NaN', 1))
    with pytest.raises(ManifestError, match="NaN is not JSON"):
        open_cache(cache)


def test_unsafe_name_error_is_a_manifest_error_naming_the_field(cache: Path) -> None:
    edit_manifest(cache, lambda m: m["shards"][1].update(name=SHARD0 + "\n"))
    with pytest.raises(UnsafePathError, match=r"shards\[1\].*'shard-u000000000-p0000\.arrow\\n'"):
        open_cache(cache)


# ------------------------------------------------------------ printable output


def test_cache_info_never_prints_escape_sequences(cache: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["identity"]["teacher"]["name"] = "evil" + ESCAPES
        m["identity"]["dataset"]["name"] = ESCAPES
        m["created_at"] = ESCAPES
    edit_manifest(cache, change)
    runner = CliRunner()
    for args in (["info", str(cache)], ["info", "--json", str(cache)]):
        res = runner.invoke(cache_app, args)
        assert res.exit_code == 0, res.output
        assert not any(not c.isprintable() and c != "\n" for c in res.output), repr(res.output)
    text = runner.invoke(cache_app, ["info", str(cache)]).output
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x1b[Kok \\u202e" in text


def test_printable_escapes_controls_and_bidi_and_cuts() -> None:
    assert printable("ok\x1b[2J\x07\u202e\U000e0001") == "ok\\x1b[2J\\x07\\u202e\\U000e0001"
    assert printable("naïve ✓ 日本") == "naïve ✓ 日本"
    assert printable("x" * 10, 4) == "xxxx…"
