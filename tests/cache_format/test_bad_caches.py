"""Every bad cache fails with its own error class and a one-line message naming what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cache_format import CacheError, open_cache, verify_cache
from helpers.bad_caches import CASES
from helpers.cache import write_topk_cache
from pipeline.cli import main


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_topk_cache(tmp_path_factory.mktemp("good") / "c", units=2)


def run(op: str, root: Path) -> None:
    if op == "open":
        open_cache(root)
    elif op == "read":
        for _ in open_cache(root).iter_rows():
            pass
    else:
        verify_cache(root)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_cache_raises_its_error(case: str, good_cache: Path, tmp_path: Path) -> None:
    gen, op, error, pattern = CASES[case]
    root = tmp_path / case
    shutil.copytree(good_cache, root)
    gen(root)
    with pytest.raises(error, match=pattern) as info:
        run(op, root)
    assert "\n" not in str(info.value)
    # verify catches every problem that reading or opening catches.
    with pytest.raises(CacheError):
        verify_cache(root)


def test_good_cache_passes(good_cache: Path) -> None:
    assert verify_cache(good_cache)["rows"] == 8


def test_cli_verify_names_the_bad_shard_and_exits_2(good_cache: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "bad"
    shutil.copytree(good_cache, root)
    CASES["flipped_byte"][0](root)
    with pytest.raises(SystemExit) as exc:
        main(["cache", "verify", "-q", str(root)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: shard ") and "shard-u000000000-p0000.arrow" in err and err.count("\n") == 0
