"""Issue 10: one flipped bit in a shard or in ``manifest.json`` ends in a clean ``CacheError`` or in the
original data — never in different data handed to a consumer, never in another exception (a traceback).

Hypothesis picks the bit (derandomized, so a run is reproducible; no shrinking, so a failure is reported
at once). Each example flips one bit of a private copy of a small valid cache (``helpers.hostile.write_base``:
2 shards x 4 rows, top-k k=8) and reads it with the public entry points:
``open_cache(path).iter_rows()`` (what ``train-student`` and ``eval`` consume) and ``verify_cache(path)``.

* Shard flip, manifest unchanged: the shard no longer matches its sha256, so ``verify_cache`` must reject
  it, and ``iter_rows`` must either raise a ``CacheError`` or return exactly the original rows.
* Shard flip, manifest updated to the damaged file's size and sha256 (a cache *made* like this): the
  checksum cannot help, so different-but-valid data is unavoidable; but whenever ``verify_cache`` rejects
  the cache, ``iter_rows`` must reject it too (the decoder applies verify's per-row rules; duplicate sample
  ids, a cache-wide property, are left to the consumers and to ``test_hostile.py``), and neither may raise
  anything but a ``CacheError``.
* Manifest flip: ``iter_rows`` and ``verify_cache`` raise a ``CacheError`` or read the original rows.

``KDPIPE_BITFLIP_EXAMPLES`` (default 300) sets the examples per test (3 tests, ~20 s in all on a loaded box).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cache_format import CacheError, DuplicateError, open_cache, verify_cache
from helpers.hostile import MANIFEST, SHARD0, refresh, write_base

EXAMPLES = int(os.environ.get("KDPIPE_BITFLIP_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def _arr(a: Any) -> Any:
    return None if a is None else (np.asarray(a).dtype.str, np.asarray(a).shape, np.asarray(a).tobytes())


def rows_of(path: Path) -> list[tuple[Any, ...]]:
    """Every decoded row of the cache, as comparable tuples (bytes of every array, dtype and shape included)."""
    reader = open_cache(path)
    try:
        return [(r.sample_id, r.label, r.shard_index, r.row_index, *(_arr(a) for a in (
            r.input_ids, r.positions, r.ids, r.logprobs, r.tail, r.counts, r.class_logits)))
            for r in reader.iter_rows()]
    finally:
        reader.close()


FIELDS = ("sample_id", "label", "shard_index", "row_index", "input_ids", "positions", "ids", "logprobs", "tail",
          "counts", "class_logits")


def first_difference(rows: list[tuple[Any, ...]], original: list[tuple[Any, ...]]) -> str | None:
    if len(rows) != len(original):
        return f"{len(rows)} rows instead of {len(original)}"
    for i, (a, b) in enumerate(zip(rows, original, strict=True)):
        for name, x, y in zip(FIELDS, a, b, strict=True):
            if x != y:
                return f"row {i} ({b[0]!r}) field {name} differs"
    return None


def attempt(fn: Callable[[], Any], what: str) -> tuple[str, Any]:
    """("ok", value) or ("error", CacheError); any other exception fails the test (it would be a traceback)."""
    try:
        return "ok", fn()
    except CacheError as exc:
        return "error", exc
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        pytest.fail(f"{what} raised {type(exc).__name__}: {str(exc)[:300]} (not a CacheError: the CLI would "
                    "print a traceback)")


class Pristine(tuple):  # type: ignore[type-arg]
    """(cache root, its rows, shard 0 size, manifest size), with a short repr for hypothesis' reports."""

    def __repr__(self) -> str:
        return f"<valid cache {self[0]}>"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    root = write_base(tmp_path_factory.mktemp("bitflip") / "cache")
    return Pristine((root, rows_of(root), (root / SHARD0).stat().st_size, (root / MANIFEST).stat().st_size))


def _flipped(src: Path, dst: Path, name: str, bit: int) -> None:
    shutil.copytree(src, dst)
    data = bytearray((dst / name).read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    (dst / name).write_bytes(bytes(data))


def _where(name: str, bit: int) -> str:
    return f"{name} byte {bit // 8} bit {bit % 8}"


@FUZZ
@given(data=st.data())
def test_shard_bitflip_is_caught_or_harmless(pristine: Pristine, data: st.DataObject) -> None:
    root, original, size, _ = pristine
    bit = data.draw(st.integers(0, size * 8 - 1), label="bit")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        _flipped(root, path, SHARD0, bit)
        where = _where(SHARD0, bit)
        kind, rows = attempt(lambda: rows_of(path), f"iter_rows after flipping {where}")
        if kind == "ok" and (diff := first_difference(rows, original)):
            pytest.fail(f"flipping {where} (sha256 no longer matches the manifest): open_cache().iter_rows() "
                        f"returned DIFFERENT data ({diff}) instead of a CacheError")
        kind, _ = attempt(lambda: verify_cache(path), f"verify_cache after flipping {where}")
        assert kind == "error", f"verify_cache accepted the cache after flipping {where} (sha256 mismatch)"


@FUZZ
@given(data=st.data())
def test_shard_bitflip_with_matching_checksum_is_never_consumed_if_verify_rejects(
        pristine: Pristine, data: st.DataObject) -> None:
    root, _, size, _ = pristine
    bit = data.draw(st.integers(0, size * 8 - 1), label="bit")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        _flipped(root, path, SHARD0, bit)
        refresh(path, SHARD0)  # the manifest now vouches for the damaged bytes
        where = _where(SHARD0, bit) + " (manifest updated)"
        kind_rows, _ = attempt(lambda: rows_of(path), f"iter_rows after flipping {where}")
        kind_verify, err = attempt(lambda: verify_cache(path), f"verify_cache after flipping {where}")
        if kind_verify == "error" and not isinstance(err, DuplicateError):
            assert kind_rows == "error", (f"after flipping {where}, verify_cache rejects the cache "
                                          f"({type(err).__name__}: {str(err)[:200]}) but open_cache().iter_rows() "
                                          "returned its rows: a consumer would train on them")


@FUZZ
@given(data=st.data())
def test_manifest_bitflip_is_caught_or_harmless(pristine: Pristine,
                                                data: st.DataObject) -> None:
    root, original, _, size = pristine
    bit = data.draw(st.integers(0, size * 8 - 1), label="bit")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        _flipped(root, path, MANIFEST, bit)
        where = _where(MANIFEST, bit)
        kind, rows = attempt(lambda: rows_of(path), f"iter_rows after flipping {where}")
        if kind == "ok" and (diff := first_difference(rows, original)):
            pytest.fail(f"flipping {where}: open_cache().iter_rows() returned DIFFERENT data ({diff}) "
                        "instead of a CacheError")
        attempt(lambda: verify_cache(path), f"verify_cache after flipping {where}")
