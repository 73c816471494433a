"""Dump-specific fixtures: one vLLM engine per test session, small datasets of each recipe's shape."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """One torch thread for the test, restored after: tiny models on a shared 2-core box run
    ~10x faster single-threaded (measured: a 119-unit dump 1.4 s vs 22 s of teacher time)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vllm_teacher(tiny_lm_dir: Path) -> Iterator[Any]:
    """The tiny LM loaded once in vLLM (float32, eager): each load costs 10-40 s of CI."""
    from pipeline.dump.teachers import TeacherSettings, make_backend

    backend = make_backend(
        TeacherSettings(model=str(tiny_lm_dir), backend="vllm", dtype="float32", max_length=256,
                        max_logprobs=16, enforce_eager=True)
    )
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def hf_teacher(tiny_lm_dir: Path, tiny_tokenizer: Any) -> Any:
    from pipeline.dump.teachers import TeacherSettings, make_backend

    return make_backend(
        TeacherSettings(model=str(tiny_lm_dir), backend="hf", dtype="float32", device="cpu", batch_size=4,
                        extra={"pad_token_id": tiny_tokenizer.pad_token_id})
    )


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_texts: list[str]) -> Path:
    """Small files in the shapes the recipes read: wikitext txt, SST-2 lines, GSM8K jsonl,
    summarize_from_feedback-style jsonl (nested info/summary, one news row with an empty post)."""
    out = tmp_path_factory.mktemp("dump_data")
    (out / "wiki.txt").write_text("\n".join(["= Heading =", "", *tiny_texts[:40]]) + "\n")
    (out / "sst2.train").write_text(
        "\n".join(f"{i % 2} {t.rstrip('.')}" for i, t in enumerate(tiny_texts[:24])) + "\n"
    )
    with (out / "gsm8k.jsonl").open("w") as fh:
        for i in range(10):
            fh.write(json.dumps({"question": tiny_texts[i], "answer": f"{tiny_texts[i + 50]} #### {i}"}) + "\n")
    with (out / "tldr.jsonl").open("w") as fh:
        for i in range(8):
            post = "" if i == 3 else " ".join(tiny_texts[i * 3 : i * 3 + 3])
            article = " ".join(tiny_texts[100 + i : 103 + i]) if i == 3 else None
            row = {"info": {"id": str(i), "post": post, "article": article, "title": "t", "subreddit": "cats"},
                   "summary": {"text": tiny_texts[200 + i], "policy": "ref"}}
            fh.write(json.dumps(row) + "\n")
    return out


def assert_same_content(a: Path, b: Path, atol: float = 0.0) -> None:
    """Two caches hold the same rows in the same order (decoded content, not bytes)."""
    from cache_format import open_cache

    ra, rb = list(open_cache(str(a)).iter_rows()), list(open_cache(str(b)).iter_rows())
    assert [r.sample_id for r in ra] == [r.sample_id for r in rb]
    for x, y in zip(ra, rb, strict=True):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.positions, y.positions)
        assert x.label == y.label
        for f in ("ids", "counts"):
            if getattr(x, f) is not None:
                np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
        for f in ("logprobs", "tail", "class_logits"):
            if getattr(x, f) is not None:
                np.testing.assert_allclose(getattr(x, f), getattr(y, f), atol=atol, rtol=0)


@pytest.fixture(scope="session")
def same_content() -> Callable[..., None]:
    return assert_same_content
