"""Streaming sources: units cover every row exactly once and in order, each read from its own slice."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.dump import sources
from pipeline.dump.sources import open_source
from pipeline.errors import DatasetError

SIZES = (1, 2, 3, 7, 64, 1 << 20)  # bytes or rows per unit: one each, odd, larger than the file


def _all(src: sources.Source) -> list[tuple[int, dict[str, Any]]]:
    """(row key, row) of every unit, concatenated in unit order."""
    out = []
    for u in range(src.num_units):
        ds = src.read_unit(u)
        names = sorted(ds.columns)
        out += [(k, {n: ds.columns[n][i] for n in names}) for i, k in enumerate(ds.keys)]
    return out


def _line_rows(data: bytes) -> list[tuple[int, str]]:
    """Expected (byte offset, text) of every line: an independent reading of the rule."""
    out, pos = [], 0
    for raw in data.split(b"\n"):
        out.append((pos, raw.removesuffix(b"\r").decode()))
        pos += len(raw) + 1
    if data.endswith(b"\n") or not data:
        out.pop()
    return out


TEXT = "first line\r\n\nä second, straddles\n" + "x" * 40 + "\n\nlast without newline"


@pytest.mark.parametrize("size", SIZES)
def test_text_units_cover_every_line_once(tmp_path: Path, size: int) -> None:
    p = tmp_path / "d.txt"
    p.write_bytes(TEXT.encode())
    src = open_source(str(p), unit_bytes=size)
    assert src.num_units == -(-len(TEXT.encode()) // size) and src.num_rows == 6
    assert [(k, r["text"]) for k, r in _all(src)] == _line_rows(TEXT.encode())
    assert src.units_identity() == {"rule": "bytes", "unit_bytes": size, "count": src.num_units,
                                    "row_key": sources.BYTE_KEY}


@pytest.mark.parametrize("size", SIZES)
def test_jsonl_and_sst2_units(tmp_path: Path, size: int) -> None:
    recs = [{"a": i, "b": {"c": "é" * i}} for i in range(6)]
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    data = ("\n".join(lines[:3]) + "\n\n" + "\r\n".join(lines[3:])).encode()
    (tmp_path / "d.jsonl").write_bytes(data)
    got = _all(open_source(str(tmp_path / "d.jsonl"), unit_bytes=size))
    want = [(k, t) for k, t in _line_rows(data) if t.strip()]
    assert [k for k, _ in got] == [k for k, _ in want]
    assert [r for _, r in got] == [{"a": i, "b.c": "é" * i} for i in range(6)]
    sst = b"1 a good film\n\n0 a bad one\r\n1 fine"
    (tmp_path / "s.dev").write_bytes(sst)
    got = _all(open_source(str(tmp_path / "s.dev"), fmt="sst2", unit_bytes=size))
    assert got == [(0, {"label": 1, "sentence": "a good film"}), (15, {"label": 0, "sentence": "a bad one"}),
                   (28, {"label": 1, "sentence": "fine"})]


@pytest.mark.parametrize("size", (1, 2, 4, 100))
def test_csv_row_units_keep_quoted_newlines(tmp_path: Path, size: int) -> None:
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"two\nlines",1\nplain,0\n\n"a ""q"", b",1\nlast,0\n', newline="")
    src = open_source(str(p), unit_rows=size)
    assert src.num_rows == 4 and src.num_units == -(-4 // size)
    assert _all(src) == [(0, {"text": "two\nlines", "label": "1"}), (1, {"text": "plain", "label": "0"}),
                         (2, {"text": 'a "q", b', "label": "1"}), (3, {"text": "last", "label": "0"})]
    assert [r["text"] for _, r in _all(open_source(str(p), unit_rows=size, limit=3))] == ["two\nlines", "plain",
                                                                                          'a "q", b']


@pytest.mark.parametrize("size", (1, 2, 4, 5, 100))
def test_parquet_row_units_over_several_row_groups(tmp_path: Path, size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(10)], "n": list(range(10))}), p, row_group_size=3)
    assert pq.ParquetFile(p).metadata.num_row_groups == 4
    src = open_source(str(p), unit_rows=size)
    assert _all(src) == [(i, {"text": f"t{i}", "n": i}) for i in range(10)]
    assert [k for k, _ in _all(open_source(str(p), unit_rows=size, limit=7))] == list(range(7))


@pytest.mark.parametrize("size", (1, 3, 100))
def test_saved_dataset_row_units(tmp_path: Path, size: int) -> None:
    import datasets

    datasets.Dataset.from_list([{"q": f"q{i}", "info": {"post": f"p{i}"}} for i in range(5)]).save_to_disk(
        str(tmp_path / "ds"))
    src = open_source(str(tmp_path / "ds"), unit_rows=size)
    assert _all(src) == [(i, {"q": f"q{i}", "info.post": f"p{i}"}) for i in range(5)]
    assert src.identity()["format"] == "hf" and src.units_identity()["row_key"] == "row index"
    assert len(_all(open_source(str(tmp_path / "ds"), unit_rows=size, limit=2))) == 2


def test_json_array_is_one_table(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}, {"text": "z"}]))
    src = open_source(str(tmp_path / "a.json"), unit_rows=2)
    assert src.units_identity()["rule"] == "rows" and [r["text"] for _, r in _all(src)] == ["x", "y", "z"]


@pytest.mark.parametrize("size", (1, 5, 1 << 20))
def test_limit_ends_line_files_after_row_n(tmp_path: Path, size: int) -> None:
    p = tmp_path / "d.txt"
    p.write_bytes(TEXT.encode())
    src = open_source(str(p), unit_bytes=size, limit=3)
    assert src.num_rows == 3 and [r["text"] for _, r in _all(src)] == ["first line", "", "ä second, straddles"]
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
    assert [r["a"] for _, r in _all(open_source(str(tmp_path / "d.jsonl"), unit_bytes=size, limit=2))] == [1, 2]
    # Identity: the fingerprint covers the bytes (SPEC §2.2 tree digest), num_rows how many rows were used.
    from pipeline.dump.fingerprints import dataset_fingerprint

    assert open_source(str(p), limit=3).fingerprint == open_source(str(p)).fingerprint == dataset_fingerprint(
        tmp_path, [p])
    assert open_source(str(p), limit=3).identity()["num_rows"] == 3 != open_source(str(p)).identity()["num_rows"]


class _Counting(io.RawIOBase):
    """A raw file that counts the bytes read through it."""

    total = 0

    def __init__(self, path: Path) -> None:
        self._fh = path.open("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._fh.seek(pos, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, b: Any) -> int:
        n = self._fh.readinto(b)
        _Counting.total += n or 0
        return n  # type: ignore[return-value]

    def close(self) -> None:
        self._fh.close()
        super().close()


def test_a_unit_reads_only_its_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "big.txt"
    line = b"some words of a document here\n"
    p.write_bytes(line * 70_000)  # ~2 MiB
    src = open_source(str(p), unit_bytes=4096)
    monkeypatch.setattr(sources, "open_binary", lambda path: io.BufferedReader(_Counting(path)))
    _Counting.total = 0
    ds = src.read_unit(src.num_units // 2)
    assert ds.num_rows in (136, 137, 138)
    # The unit, one line past its end, and the read buffer: never the 2 MiB file.
    assert _Counting.total <= 4096 + 2 * 8192 + len(line)


def test_bad_lines_name_file_and_byte_offset(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(DatasetError, match=r"bad\.txt: the line at byte 3 is not valid UTF-8.*re-encode"):
        _all(open_source(str(tmp_path / "bad.txt"), unit_bytes=2))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl: the line at byte 9 is not valid JSON"):
        _all(open_source(str(tmp_path / "bad.jsonl")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DatasetError, match=r"empty\.txt has no rows"):
        open_source(str(tmp_path / "empty.txt"))


# ----------------------------------------------------------------------------- in a dump


def test_dump_packs_per_unit_and_a_resume_reads_no_finished_unit(
    tiny_lm_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_one_thread: None
) -> None:
    from cache_format import open_cache
    from pipeline.dump.lm import parse_lm_sample_id
    from pipeline.dump.run import DumpConfig, run_dump

    data, B = data_dir / "wiki.txt", 300
    cfg = DumpConfig(teacher=str(tiny_lm_dir), dataset=str(data), out=str(tmp_path / "c"), top_k=4, max_length=24,
                     unit_bytes=B, device="cpu", progress=False)
    first = run_dump(cfg)
    cache = open_cache(str(tmp_path / "c"))
    n_units = -(-data.stat().st_size // B)
    assert cache.manifest.identity.recipe["units"] == {"rule": "bytes", "unit_bytes": B, "count": n_units,
                                                       "row_key": sources.BYTE_KEY}
    keys = {k for k, t in _line_rows(data.read_bytes()) if t.strip()}
    ids = [parse_lm_sample_id(str(r.sample_id)) for r in cache.iter_rows()]
    assert {i.doc for i in ids} <= keys and {i.first_doc for i in ids} <= keys
    assert all(i.doc // B == i.first_doc // B for i in ids)  # packing restarts at each unit: no window spans two
    assert first["units_total"] == n_units > 3

    reads: list[int] = []
    read_unit = sources.LineSource.read_unit
    monkeypatch.setattr(sources.LineSource, "read_unit", lambda self, u: (reads.append(u), read_unit(self, u))[1])
    again = run_dump(cfg)
    # Only the probe (the first unit with rows, so a wrong field fails before the teacher loads).
    assert again["units_done"] == 0 and again["rows"] == first["rows"] and reads == [0]


def test_row_units_two_workers_and_merge_equal_one(tiny_lm_dir: Path, tiny_texts: list[str], tmp_path: Path,
                                                   same_content: Any, monkeypatch: pytest.MonkeyPatch,
                                                   torch_one_thread: None) -> None:
    import csv

    from cache_format import merge_caches, open_cache
    from cache_format.finalize import finalize_cache
    from pipeline.dump.run import DumpConfig, run_dump

    data = tmp_path / "d.csv"
    with data.open("w", newline="") as fh:
        csv.writer(fh).writerows([["id", "text"], *[[i, t] for i, t in enumerate(tiny_texts[:30])]])
    base = {"teacher": str(tiny_lm_dir), "dataset": str(data), "top_k": 4, "max_length": 24, "unit_rows": 4,
            "device": "cpu", "progress": False}
    run_dump(DumpConfig(**base, out=str(tmp_path / "one")))
    parts = []
    reads: list[int] = []
    read_unit = sources.CsvSource.read_unit
    monkeypatch.setattr(sources.CsvSource, "read_unit", lambda self, u: (reads.append(u), read_unit(self, u))[1])
    for i in range(2):
        parts.append(str(tmp_path / f"p{i}"))
        reads.clear()
        s = run_dump(DumpConfig(**base, out=parts[-1], num_workers=2, worker_index=i))
        assert s["units_total"] == 8 and s["units_mine"] == 4
        assert sorted(reads) == [i, i + 2, i + 4, i + 6]  # a worker reads its own units only, each once
        assert not s["finalized"]  # its own --out: worker i's units only
        finalize_cache(parts[-1], allow_missing=True)  # `kdpipe cache finalize --partial`
    merge_caches(str(tmp_path / "merged"), parts)
    same_content(tmp_path / "one", tmp_path / "merged")
    units = open_cache(str(tmp_path / "one")).manifest.identity.recipe["units"]
    assert units == {"rule": "rows", "unit_rows": 4, "count": 8, "row_key": "row index"}
