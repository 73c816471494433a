"""The vLLM backend writes the same cache as the HF backend (reusing the session's one engine).

Hidden-state capture (sampled, classification, several caches from one pass) is checked against
HF in ``test_vllm_capture.py``, next to its engines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from cache_format import open_cache, verify_cache
from pipeline.dump.run import DumpConfig, run_dump


def _cfg(model: Path, data: Path, out: Path, backend: str, **kw: Any) -> DumpConfig:
    base: dict[str, Any] = {"teacher": str(model), "dataset": str(data), "out": str(out), "backend": backend,
                            "top_k": 16, "max_length": 48, "unit_rows": 4, "unit_bytes": 256, "batch_size": 4, "device": "cpu",
                            "progress": False}
    return DumpConfig(**{**base, **kw})


def _compare(a: Path, b: Path) -> None:
    ra, rb = list(open_cache(str(a)).iter_rows()), list(open_cache(str(b)).iter_rows())
    assert [r.sample_id for r in ra] == [r.sample_id for r in rb]
    same_ids = total = 0
    for x, y in zip(ra, rb, strict=True):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.positions, y.positions)
        same_ids += int((x.ids == y.ids).sum())
        total += x.ids.size
        # Stored values are quantized (1/8 nat): a 1e-5 difference may cross one step.
        assert np.abs(x.logprobs - y.logprobs).max() <= 0.125 + 1e-3
    assert same_ids / total > 0.99


@pytest.mark.vllm
def test_vllm_dump_equals_hf_dump(vllm_teacher: Any, tiny_lm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    hf, vl = tmp_path / "hf", tmp_path / "vllm"
    run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", hf, "hf"))
    s = run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", vl, "vllm"), backend=vllm_teacher)
    assert s["teacher_s"] > 0 and verify_cache(str(vl))["ok"] and s["capture"] == "vllm:logprobs"
    ident = open_cache(str(vl)).manifest.identity
    assert ident.teacher["backend"] == "vllm" and ident.run["vllm_capture"] == "logprobs"
    _compare(hf, vl)
    # Sequence-level KD: both engines write the same greedy answers.
    hf_gen, vl_gen = tmp_path / "hf_gen", tmp_path / "vl_gen"
    kw = {"task": "reasoning", "teacher_generates": True, "max_new_tokens": 8, "limit": 4, "max_length": 96}
    run_dump(_cfg(tiny_lm_dir, data_dir / "gsm8k.jsonl", hf_gen, "hf", **kw))
    run_dump(_cfg(tiny_lm_dir, data_dir / "gsm8k.jsonl", vl_gen, "vllm", **kw), backend=vllm_teacher)
    _compare(hf_gen, vl_gen)


@pytest.mark.parametrize(
    ("kw", "path"),
    [
        ({}, "logprobs"),  # one top-k cache at temperature 1: prompt log-probs
        ({"encoding": "sampled"}, "hidden"),
        ({"out_sampled": "b"}, "hidden"),
        ({"temperature": 2.0}, "hidden"),
        ({"task": "classification"}, "hidden"),
        ({"vllm_capture": "hidden"}, "hidden"),
    ],
)
def test_capture_path_is_chosen_per_encoding(kw: dict[str, Any], path: str) -> None:
    assert _cfg(Path("t"), Path("d"), Path("o"), "vllm", **kw).capture_path() == path
    assert _cfg(Path("t"), Path("d"), Path("o"), "hf", **{**kw, "vllm_capture": "auto"}).capture_path() is None


def test_teacher_generates_needs_the_logprobs_capture() -> None:
    with pytest.raises(ValidationError, match="pooling runner behind hidden-state capture cannot generate"):
        _cfg(Path("t"), Path("d"), Path("o"), "vllm", task="reasoning", teacher_generates=True, encoding="sampled")
