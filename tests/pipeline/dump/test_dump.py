"""`run_dump` end to end on tiny data: every recipe, resume, refusal of other settings, workers + merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache_format import open_cache, verify_cache
from pipeline.dump.lm import default_stride, parse_lm_sample_id
from pipeline.dump.run import DumpConfig, my_units, run_dump
from pipeline.errors import KdpipeError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _cfg(model: Path, data: Path, out: Path, **kw: Any) -> DumpConfig:
    base: dict[str, Any] = {"teacher": str(model), "dataset": str(data), "out": str(out), "top_k": 8,
                            "max_length": 32, "unit_rows": 4, "unit_bytes": 256, "batch_size": 4, "device": "cpu",
                            "progress": False}
    base.update(kw)
    return DumpConfig(**base)


def _rows(path: Path) -> list[Any]:
    return list(open_cache(str(path)).iter_rows())


def test_units_are_split_round_robin() -> None:
    assert my_units(5, 2, 0) == [0, 2, 4] and my_units(5, 2, 1) == [1, 3]


def test_lm_dump_matches_teacher(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path, hf_teacher: Any) -> None:
    out = tmp_path / "lm"
    s = run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out))
    # Windows overlap (default stride): the start of every row after the first is context only.
    assert s["rows"] > 4 and s["positions"] < s["tokens"] - s["rows"]
    assert s["units_done"] == s["units_total"] and s["teacher_s"] > 0 and 0 <= s["outside_teacher_share"] <= 1
    # The resolved config sits beside the cache (SPEC §1 lists a cache folder's files) and in identity.run.
    assert (tmp_path / "lm.config.yaml").is_file() and (out / "manifest.json").is_file()
    assert not (out / "config.yaml").exists()
    assert open_cache(str(out)).manifest.identity.run["top_k"] == 8
    assert verify_cache(str(out))["ok"]
    rows = _rows(out)
    firsts = [parse_lm_sample_id(r.sample_id) for r in rows]  # provenance, in stream order
    assert [(f.doc, f.tok) for f in firsts] == sorted((f.doc, f.tok) for f in firsts)
    assert all(len(r.input_ids) == 32 for r in rows[:-1])  # packed windows
    r = rows[1]
    stride = default_stride(32)  # the window's new tokens are its targets
    np.testing.assert_array_equal(r.positions, np.arange(32 - stride - 1, 31))
    ids, lps = hf_teacher.topk([r.input_ids], [r.positions], 8)
    # Caches list entries of equal quantized value by rank (id_coding "set", SPEC §3.1.1): compare id sets.
    np.testing.assert_array_equal(np.sort(r.ids, axis=1), np.sort(ids, axis=1))
    # Stored log-probs are quantized (step 1/8) and renormalised with the tail.
    assert np.abs(r.logprobs - lps).max() < 0.1
    man = open_cache(str(out)).manifest
    assert man.identity.recipe["task"] == "lm" and man.identity.encoding.k == 8


def test_lm_no_pack_and_context_cut(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    s = run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", tmp_path / "c", pack=False, max_length=8))
    assert s["split_documents"] > 0
    assert all(len(r.input_ids) <= 8 for r in _rows(tmp_path / "c"))


def test_classification_dump(tiny_classifier_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cls"
    s = run_dump(_cfg(tiny_classifier_dir, data_dir / "sst2.train", out, task="classification", limit=10))
    assert s["rows"] == 10
    rows = _rows(out)
    assert [r.label for r in rows] == [i % 2 for i in range(10)]
    assert rows[0].class_logits.shape == (2,) and len(rows[0].positions) == 0
    assert verify_cache(str(out))["ok"]


def test_summarization_dump_targets_only_the_summary(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path,
                                                     tiny_tokenizer: Any) -> None:
    out = tmp_path / "sum"
    run_dump(_cfg(tiny_lm_dir, data_dir / "tldr.jsonl", out, task="summarization", max_length=96))
    rows = _rows(out)
    assert len(rows) == 8
    for r in rows:
        text = tiny_tokenizer.decode(r.input_ids[r.positions[0] + 1 :])
        assert "TL;DR:" not in text and r.input_ids[-1] == tiny_tokenizer.eos_token_id
        assert "TL;DR:" in tiny_tokenizer.decode(r.input_ids[: r.positions[0] + 1])
        np.testing.assert_array_equal(np.diff(r.positions), 1)
        assert r.positions[-1] == len(r.input_ids) - 2
    # Row 3 has an empty post: its article is used instead.
    assert len(rows[3].input_ids) > 10


def test_reasoning_dump_and_teacher_generates(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path,
                                              tiny_tokenizer: Any, hf_teacher: Any) -> None:
    ref = tmp_path / "ref"
    run_dump(_cfg(tiny_lm_dir, data_dir / "gsm8k.jsonl", ref, task="reasoning", max_length=64))
    rows = _rows(ref)
    assert len(rows) == 10 and "####" in tiny_tokenizer.decode(rows[0].input_ids[rows[0].positions[0] + 1 :])
    gen = tmp_path / "gen"
    s = run_dump(_cfg(tiny_lm_dir, data_dir / "gsm8k.jsonl", gen, task="reasoning", max_length=64,
                      teacher_generates=True, max_new_tokens=6, limit=3))
    assert s["rows"] == 3
    for r in _rows(gen):
        prompt = r.input_ids[: r.positions[0] + 1]
        answer = hf_teacher.generate([prompt], 6, tiny_tokenizer.eos_token_id)[0]
        np.testing.assert_array_equal(r.input_ids[len(prompt) :], answer)


def test_sampled_dump_is_seeded(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path, same_content: Any) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out, encoding="sampled", num_draws=16, limit=6))
    same_content(a, b)
    r = _rows(a)[0]
    assert r.counts.sum(axis=1).tolist() == [16] * len(r.positions)


def test_resume_skips_done_units_and_refuses_other_settings(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    first = run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out, limit=12))
    again = run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out, limit=12))
    assert again["units_done"] == 0 and again["units_resumed"] == first["units_done"]
    assert again["rows"] == first["rows"]
    with pytest.raises(KdpipeError, match=r"encoding\.k: 8 != 4"):
        run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out, limit=12, top_k=4))
    w = tmp_path / "w"
    # Workers of one dump share one --out: the first leaves it unfinished, the last finalizes it.
    assert not run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", w, limit=12, num_workers=2, worker_index=0))["finalized"]
    assert run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", w, limit=12, num_workers=2, worker_index=1))["finalized"]
    s = run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out, limit=12, top_k=4, overwrite=True))
    assert s["units_done"] == s["units_total"]


def test_unreadable_cache_is_refused_until_overwrite(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    out.mkdir()
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(KdpipeError, match=r"--out .* cannot read .*manifest\.json.*--overwrite"):
        run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out, limit=4))
    s = run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", out, limit=4, overwrite=True))
    assert s["units_done"] == s["units_total"] and verify_cache(str(out))["ok"]


def test_two_workers_into_one_out_equal_one_worker(tiny_lm_dir: Path, data_dir: Path, tmp_path: Path,
                                                   same_content: Any) -> None:
    one = tmp_path / "one"
    run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", one))
    shared = tmp_path / "shared"
    for i in range(2):
        s = run_dump(_cfg(tiny_lm_dir, data_dir / "wiki.txt", shared, num_workers=2, worker_index=i))
        assert s["units_mine"] == len(my_units(s["units_total"], 2, i))
        assert s["finalized"] == (i == 1)
    assert verify_cache(str(shared))["ok"]
    same_content(one, shared)


def test_resume_with_other_weights_under_the_same_path_is_refused(
    tiny_lm_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from pipeline.demo.toy import build_llama

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_lm_dir, teacher)
    out = tmp_path / "c"
    first = run_dump(_cfg(teacher, data_dir / "wiki.txt", out, limit=4))
    revision = open_cache(str(out)).manifest.identity.teacher["revision"]
    assert revision.startswith("sha256:") and first["rows"] > 0
    # Same folder, retrained (here: re-initialised) weights: the cache no longer describes it.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    build_llama(len(tok), tokenizer=tok, out_dir=teacher, seed=123)
    with pytest.raises(KdpipeError, match=r"teacher\.revision"):
        run_dump(_cfg(teacher, data_dir / "wiki.txt", out, limit=4))
