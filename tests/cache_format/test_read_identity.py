"""read_identity(): the identity of a finished or unfinished cache, None for an absent/empty folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_format import CacheNotFoundError, CacheWriter, TopKEncoding, read_identity
from cache_format.errors import ManifestError
from cache_format.manifest import INCOMPLETE_MARKER, MANIFEST_NAME
from helpers.cache import identity, topk_batch, write_topk_cache


def test_absent_or_empty_folder_has_no_identity(tmp_path: Path) -> None:
    assert read_identity(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert read_identity(tmp_path / "empty") is None
    assert read_identity(f"file://{tmp_path / 'empty'}") is None


def test_finished_cache_identity_comes_from_the_manifest(tmp_path: Path) -> None:
    root = write_topk_cache(tmp_path / "c", units=1, k=4)
    got = read_identity(root)
    assert got is not None and got.diff(identity(TopKEncoding(k=4))) == []


def test_unfinished_cache_identity_comes_from_the_marker(tmp_path: Path) -> None:
    ident = identity(TopKEncoding(k=8), run={"worker": 3})
    w = CacheWriter(tmp_path / "c", ident)
    w.write(topk_batch(["a"]))
    w.end_unit(0)
    w.close()  # interrupted: no manifest yet
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()
    got = read_identity(tmp_path / "c")
    assert got == ident


def test_unreadable_marker_or_manifest_is_a_manifest_error(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    (root / INCOMPLETE_MARKER).write_text("{not json")
    with pytest.raises(ManifestError, match=r"\.kdpipe-incomplete\.json is unreadable.*--overwrite"):
        read_identity(root)
    (root / MANIFEST_NAME).write_text("[]")
    with pytest.raises(ManifestError, match=r"manifest\.json must hold a JSON object"):
        read_identity(root)


def test_foreign_files_are_not_a_cache(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CacheNotFoundError, match=r"not empty but holds no kdpipe cache"):
        read_identity(tmp_path)
    with pytest.raises(CacheNotFoundError, match=r"is a file, not a cache folder"):
        read_identity(tmp_path / "notes.txt")
