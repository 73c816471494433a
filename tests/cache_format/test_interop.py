"""The same cache read without kdpipe: the SPEC's plain-pyarrow snippet, pyarrow tables, HF datasets."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import cache_format
from cache_format import open_cache
from helpers.cache import write_topk_cache

SPEC = Path(cache_format.__file__).parent / "SPEC.md"


@pytest.fixture(scope="module", params=["set", "planes"])  # format 1.1 (the default) and 1.0
def cache(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return write_topk_cache(tmp_path_factory.mktemp("interop") / "c", units=2, rows_per_unit=3,
                            id_coding=request.param)


def spec_snippet() -> str:
    text = SPEC.read_text()
    m = re.search(r"<!-- snippet: plain-pyarrow.*?-->\s*```python\n(.*?)```", text, re.S)
    assert m, "SPEC.md lost its plain-pyarrow snippet"
    return m.group(1)


def test_spec_snippet_decodes_like_the_library(cache: Path) -> None:
    code = spec_snippet().replace("print(", "out.append((")
    code = code.replace("logprobs[:, :3], tail)", "logprobs[:, :3], tail))")
    code = code.replace("ids.reshape(n, k)[:, :3], logprobs[:, :3]", "ids.reshape(n, k), logprobs")
    out: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, {"root": str(cache), "out": out})  # the snippet as a user would paste it
    rows = list(open_cache(cache).iter_rows())
    assert [o[0] for o in out] == [r.sample_id for r in rows]
    for (_, ids, lps, tail), r in zip(out, rows, strict=True):
        np.testing.assert_array_equal(ids, r.ids)
        np.testing.assert_allclose(lps, r.logprobs, atol=1e-5)
        np.testing.assert_allclose(tail, r.tail, rtol=1e-6)


def test_shards_are_plain_arrow_ipc_files_with_zstd(cache: Path) -> None:
    for info in open_cache(cache).shard_infos:
        reader = pa.ipc.open_file(str(cache / info.name))
        table = reader.read_all()
        assert table.num_rows == info.rows
        coding = json.loads(table.schema.metadata[b"kdpipe.encoding"]).get("id_coding", "planes")
        assert table.schema.metadata[b"kdpipe.format_version"] == {"set": b"1.1", "planes": b"1.0"}[coding]
        assert table.column("sample_id").type == pa.string()


def test_hf_datasets_loads_the_shards(cache: Path) -> None:
    datasets = pytest.importorskip("datasets")
    files = [str(cache / s.name) for s in open_cache(cache).shard_infos]
    ds = datasets.load_dataset("arrow", data_files=files, split="train",
                               cache_dir=str(cache.parent / "hf-cache"))
    assert ds.num_rows == 6
    assert ds["sample_id"] == [r.sample_id for r in open_cache(cache).iter_rows()]
    assert {"input_ids", "positions", "tail_code", "norm_code"} <= set(ds.column_names)
    assert {"topk_values", "topk_id_b0"} <= set(ds.column_names) or {"topk_set_gap", "topk_qoff"} <= set(ds.column_names)
