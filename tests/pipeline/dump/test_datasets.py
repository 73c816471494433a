"""Dataset loading: local formats, the plain formats of shared/data, saved HF datasets, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.dump.datasets import load_dataset_rows
from pipeline.errors import DatasetError

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"


def test_json_lines_nested_fields_are_flattened(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"info": {"post": f"p{i}"}, "summary": {"text": f"s{i}"}}) for i in range(3)))
    ds = load_dataset_rows(str(p), limit=2)
    assert ds.num_rows == 2 and ds.columns["info.post"] == ["p0", "p1"] and ds.columns["summary.text"][1] == "s1"
    assert ds.identity()["fingerprint"].startswith("sha256:")


def test_json_array_csv_parquet_txt(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    (tmp_path / "b.csv").write_text("sentence,label\nhello,1\nbye,0\n")
    pq.write_table(pa.table({"text": ["u", "v", "w"]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("line one\n\nline two\n")
    assert load_dataset_rows(str(tmp_path / "a.json")).columns["text"] == ["x", "y"]
    assert load_dataset_rows(str(tmp_path / "b.csv")).columns["label"] == ["1", "0"]
    assert load_dataset_rows(str(tmp_path / "c.parquet")).num_rows == 3
    assert load_dataset_rows(str(tmp_path / "d.txt")).columns["text"] == ["line one", "", "line two"]


def test_sst2_lines_and_split_folder(tmp_path: Path) -> None:
    folder = tmp_path / "sst2"
    folder.mkdir()
    (folder / "stsa.binary.train").write_text("1 a good film\n0 a bad one\n")
    (folder / "stsa.binary.dev").write_text("1 fine\n")
    ds = load_dataset_rows(str(folder), split="train")
    assert ds.columns == {"label": [1, 0], "sentence": ["a good film", "a bad one"]}
    assert load_dataset_rows(str(folder), split="validation").num_rows == 1
    with pytest.raises(DatasetError, match=r"no file for split 'test' \(--split\); files there: stsa.binary.dev"):
        load_dataset_rows(str(folder), split="test")


def test_saved_hf_dataset(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"question": ["q1", "q2"], "answer": ["a1", "a2"]}).save_to_disk(str(tmp_path / "ds"))
    ds = load_dataset_rows(str(tmp_path / "ds"), limit=1)
    assert ds.columns == {"question": ["q1"], "answer": ["a1"]}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside this checkout")
def test_shared_data_formats() -> None:
    sst = load_dataset_rows(str(SHARED / "sst2"), split="dev", limit=5)
    assert set(sst.columns) == {"label", "sentence"} and all(v in (0, 1) for v in sst.columns["label"])
    gsm = load_dataset_rows(str(SHARED / "gsm8k"), split="test", limit=3)
    assert "####" in gsm.columns["answer"][0]
    wiki = load_dataset_rows(str(SHARED / "wikitext-2"), split="validation", limit=10)
    assert wiki.num_rows == 10 and "text" in wiki.columns


def test_errors_name_the_flag(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DatasetError, match="has no rows"):
        load_dataset_rows(str(tmp_path / "e.jsonl"))
    with pytest.raises(DatasetError, match="does not exist; pass an existing file"):
        load_dataset_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "f.jsonl").write_text(json.dumps({"a": 1, "b": 2}))
    ds = load_dataset_rows(str(tmp_path / "f.jsonl"))
    with pytest.raises(DatasetError, match=r"no field 'text' \(--text-field\); available fields: a, b"):
        ds.column("text", "--text-field")
    (tmp_path / "blob.bin").write_text("\x00\x01 not a known format")
    with pytest.raises(DatasetError, match="--dataset-format"):
        load_dataset_rows(str(tmp_path / "blob.bin"))


def test_a_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    import os

    from pipeline.dump.sources import open_source

    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)  # opening it for reading would block until a writer appears: never, here
    for load in (load_dataset_rows, open_source):
        with pytest.raises(DatasetError, match=r"corpus\.txt is not a regular file or folder.*--dataset"):
            load(str(fifo))
