"""copy and merge never destroy a source, never leak a linked file, and never delete what kdpipe did not write."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import cache_format.copy as copy_module
import cache_format.merge as merge_module
from cache_format import (
    CacheExistsError,
    ChecksumMismatchError,
    copy_cache,
    merge_caches,
    open_cache,
    verify_cache,
)
from cache_format.errors import SamePathError, UnsafeFileError
from cache_format.manifest import MANIFEST_NAME
from helpers.cache import write_topk_cache
from pipeline.cli import main

SHARD0 = "shard-u000000000-p0000.arrow"
SECRET = b"[default]\naws_access_key_id = AKIAEXAMPLESECRET\naws_secret_access_key = hunter2hunter2\n"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_topk_cache(tmp_path_factory.mktemp("good") / "c", units=3)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A fresh cache each test may damage (the same content as ``good``: the writer is deterministic)."""
    return write_topk_cache(tmp_path / "c", units=3)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def all_bytes_under(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def spellings(cache: Path, tmp_path: Path) -> list[str]:
    link = tmp_path / "link-to-c"
    link.symlink_to(cache)
    return [str(cache), f"{cache}/../{cache.name}", f"{cache}/", str(link), f"file://{cache}", f"{cache}//."]


def test_copy_onto_itself_is_refused_in_every_spelling(cache: Path, tmp_path: Path) -> None:
    before = snapshot(cache)
    for dst in spellings(cache, tmp_path):
        for overwrite in (False, True):
            with pytest.raises(SamePathError, match="same place"):
                copy_cache(cache, dst, overwrite=overwrite)
            with pytest.raises(SamePathError):
                copy_cache(dst, str(cache), overwrite=overwrite)
    assert snapshot(cache) == before
    verify_cache(cache)


def test_copy_into_or_around_the_source_is_refused(cache: Path, tmp_path: Path) -> None:
    before = snapshot(cache)
    with pytest.raises(SamePathError):
        copy_cache(cache, str(cache / "inner"), overwrite=True)
    with pytest.raises(SamePathError):
        copy_cache(cache, str(tmp_path), overwrite=True)
    assert snapshot(cache) == before and not (cache / "inner").exists()


def test_a_self_copy_nobody_could_detect_still_loses_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the destination were the source under another name (a second endpoint alias, a nested bind mount)."""
    monkeypatch.setattr(copy_module, "refuse_overlap", lambda *args: None)
    before = snapshot(cache)
    copy_cache(cache, str(cache), overwrite=True)
    assert snapshot(cache) == before
    verify_cache(cache)


def test_same_bucket_and_prefix_is_refused_before_any_request() -> None:
    opts = {"endpoint_url": "http://127.0.0.1:9"}  # nothing listens there: a request would fail differently
    for src, dst in (("s3://caches/a", "s3://caches/a/"), ("s3://caches/a", "s3a://caches//a"),
                     ("s3://caches/a", "s3://caches/a/inner"), ("s3://caches/a/b", "s3://caches/a")):
        with pytest.raises(SamePathError):
            copy_cache(src, dst, src_storage_options=opts, dst_storage_options=opts, overwrite=True)


def test_cli_copy_x_x_overwrite_is_one_line_exit_2(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(cache)
    with pytest.raises(SystemExit) as exc:
        main(["cache", "copy", str(cache), f"{cache}/", "--overwrite"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot copy") and err.count("\n") == 0
    assert snapshot(cache) == before


@pytest.mark.parametrize("manifest_matches_secret", [False, True])
def test_shard_linked_to_credentials_never_reaches_the_destination(cache: Path, tmp_path: Path,
                                                                  manifest_matches_secret: bool) -> None:
    creds = tmp_path / "home" / ".aws" / "credentials"
    creds.parent.mkdir(parents=True)
    creds.write_bytes(SECRET)
    (cache / SHARD0).unlink()
    (cache / SHARD0).symlink_to(creds)
    if manifest_matches_secret:  # worst case: the sharer knows the file's size and hash
        m = json.loads((cache / MANIFEST_NAME).read_text())
        m["shards"][0].update(bytes=len(SECRET), sha256=hashlib.sha256(SECRET).hexdigest())
        m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
        (cache / MANIFEST_NAME).write_text(json.dumps(m))
    dst = tmp_path / "dst"
    with pytest.raises(UnsafeFileError, match=rf"{SHARD0} is a symbolic link"):
        copy_cache(cache, str(dst))
    assert SECRET[:20] not in all_bytes_under(dst) and b"hunter2" not in all_bytes_under(dst)
    assert not (dst / MANIFEST_NAME).exists()


def test_damaged_shard_never_appears_under_its_name_and_a_rerun_works(cache: Path, good: Path,
                                                                      tmp_path: Path) -> None:
    data = bytearray((cache / SHARD0).read_bytes())
    data[len(data) // 3] ^= 0x10
    (cache / SHARD0).write_bytes(bytes(data))
    dst = tmp_path / "dst"
    with pytest.raises(ChecksumMismatchError, match=SHARD0):
        copy_cache(cache, str(dst))
    assert not (dst / SHARD0).exists() and not list(dst.glob(".tmp-*")) and not (dst / MANIFEST_NAME).exists()
    # A copy that died half way (a shard in place, a temp file) is kdpipe's own: the rerun reuses the folder.
    shutil.copy(good / "shard-u000000001-p0000.arrow", dst / "shard-u000000001-p0000.arrow")
    (dst / f".tmp-{'ab' * 16}-{SHARD0}").write_bytes(b"half")
    copy_cache(good, str(dst))
    assert snapshot(dst) == snapshot(good)


def test_overwrite_removes_only_the_old_caches_own_files(cache: Path, good: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    copy_cache(write_topk_cache(tmp_path / "bigger", units=5), str(dst))
    (dst / "thesis.tex").write_text("four years of work")
    before = snapshot(dst)
    with pytest.raises(CacheExistsError, match=r"'thesis\.tex', not part of a kdpipe cache"):
        copy_cache(good, str(dst), overwrite=True)
    assert snapshot(dst) == before  # refused before anything was touched
    (dst / "thesis.tex").unlink()
    copy_cache(good, str(dst), overwrite=True)
    assert snapshot(dst) == snapshot(good)  # the bigger cache's extra shards went too


def test_overwrite_refuses_a_foreign_manifest_json(good: Path, tmp_path: Path) -> None:
    dst = tmp_path / "webapp"
    dst.mkdir()
    (dst / MANIFEST_NAME).write_text('{"name": "my web app", "icons": []}')
    with pytest.raises(CacheExistsError, match="not a readable kdpipe manifest"):
        copy_cache(good, str(dst), overwrite=True)
    assert (dst / MANIFEST_NAME).read_text().startswith('{"name": "my web app"')


def workers(tmp_path: Path) -> list[Path]:
    from test_merge_cli import worker_cache

    return [worker_cache(tmp_path / f"w{i}", i, 3) for i in range(3)]


def test_merge_into_an_input_is_refused(tmp_path: Path) -> None:
    parts = workers(tmp_path)
    before = snapshot(parts[0])
    for out in (parts[0], parts[0] / "merged", tmp_path, f"{parts[0]}/../{parts[0].name}/"):
        with pytest.raises(SamePathError):
            merge_caches(out, parts)
    assert snapshot(parts[0]) == before


def test_failed_merge_leaves_nothing_and_its_rerun_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = workers(tmp_path)
    out = tmp_path / "merged"
    calls = {"n": 0}
    real = merge_module.copy_shard_verified

    def disk_full_on_the_fourth(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(merge_module, "copy_shard_verified", disk_full_on_the_fourth)
    with pytest.raises(OSError, match="No space left"):
        merge_caches(out, parts)
    assert not out.exists()  # it created the folder, so it removed it
    out.mkdir()
    calls["n"] = 0
    with pytest.raises(OSError):
        merge_caches(out, parts)
    assert out.exists() and not list(out.iterdir())  # a folder it did not create stays, empty
    monkeypatch.undo()
    # What a merge killed with -9 leaves behind: some shards and a temp file, no manifest.
    shutil.copy(parts[0] / SHARD0, out / SHARD0)
    (out / f".tmp-{'cd' * 16}-shard-u000000003-p0000.arrow").write_bytes(b"torn")
    merged = merge_caches(out, parts)
    assert merged["totals"]["shards"] == 6 and verify_cache(out)["rows"] == 12
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME] + [s["name"] for s in merged["shards"]])


def test_merge_refuses_folders_that_are_not_its_leftovers(tmp_path: Path) -> None:
    parts = workers(tmp_path)
    for name in ("notes.txt", MANIFEST_NAME, ".kdpipe-incomplete.json"):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / name).write_text("keep me")
        with pytest.raises(CacheExistsError, match="not a leftover"):
            merge_caches(out, parts)
        assert (out / name).read_text() == "keep me"


def test_copy_verifies_what_it_copied(good: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    manifest = copy_cache(good, f"file://{dst}")
    assert manifest["totals"]["rows"] == open_cache(good).num_rows
    assert (dst / MANIFEST_NAME).read_bytes() == (good / MANIFEST_NAME).read_bytes()
    assert not [p for p in os.listdir(dst) if p.startswith(".tmp-")]
