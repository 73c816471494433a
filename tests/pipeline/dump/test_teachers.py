"""Teacher backends: exact top-k against a plain forward pass, sampling, generation, and HF == vLLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.dump.teachers import TeacherSettings, make_backend
from pipeline.dump.teachers.hf import chunked_topk, flat_target_index, length_batches
from pipeline.dump.teachers.vllm import flat_to_topk
from pipeline.errors import KdpipeError
from pipeline.hf_io import cut_at_eos, pad


def _seqs(vocab: int, lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(4, vocab, size=n - 1)]).astype(np.int32) for n in lengths]


def _reference_topk(model_dir: Path, seq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(seq[None].astype(np.int64))).logits[0].float()
    v, i = torch.log_softmax(logits, -1).topk(k)
    return i.numpy(), v.numpy()


def test_pure_helpers() -> None:
    ids, mask = pad([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert flat_target_index([np.array([0, 2]), np.array([0])], T=3).tolist() == [0, 2, 3]
    assert length_batches([1, 5, 3, 5], 2) == [[1, 3], [2, 0]]
    assert cut_at_eos(np.array([4, 2, 9, 9]), 2).tolist() == [4, 2]
    h = torch.randn(7, 5)
    w = torch.nn.Linear(5, 11)
    v1, i1 = chunked_topk(h, w, 3, chunk=2)
    v2, i2 = torch.log_softmax(w(h), -1).topk(3)
    torch.testing.assert_close(v1, v2)
    assert torch.equal(i1, i2)


def test_flat_to_topk_drops_extra_actual_token_and_sorts() -> None:
    # Position 0: actual token 9 outside the top-2 -> 3 entries, first dropped.
    # Position 1: 2 entries, actual token listed first but ranked second -> re-sorted.
    starts, ends = np.array([0, 3]), np.array([3, 5])
    tok = np.array([9, 4, 5, 7, 6], dtype=np.int32)
    lp = np.array([-9.0, -0.5, -1.0, -2.0, -0.1], dtype=np.float32)
    ids, lps = flat_to_topk(starts, ends, tok, lp, np.array([0, 1]), k=2)
    assert ids.tolist() == [[4, 5], [6, 7]]
    np.testing.assert_allclose(lps, [[-0.5, -1.0], [-0.1, -2.0]])


def test_hf_topk_matches_plain_forward(hf_teacher: Any, tiny_lm_dir: Path) -> None:
    seqs = _seqs(hf_teacher.vocab_size, [9, 4, 12, 7, 3], seed=1)
    positions = [np.arange(len(s), dtype=np.int32) for s in seqs]
    positions[2] = np.array([0, 5, 11], dtype=np.int32)  # sparse targets, last position included
    ids, lps = hf_teacher.topk(seqs, positions, k=8)
    assert ids.dtype == np.int32 and lps.dtype == np.float32
    assert ids.shape == (sum(len(p) for p in positions), 8)
    off = 0
    for s, p in zip(seqs, positions, strict=True):
        ref_i, ref_v = _reference_topk(tiny_lm_dir, s, 8)
        np.testing.assert_allclose(lps[off : off + len(p)], ref_v[p], atol=1e-5)
        assert (ids[off : off + len(p)] == ref_i[p]).mean() > 0.99
        off += len(p)
    assert np.all(np.diff(lps, axis=1) <= 0)


def test_hf_sampling_is_seeded_and_follows_distribution(hf_teacher: Any) -> None:
    seqs = _seqs(hf_teacher.vocab_size, [6, 9], seed=2)
    positions = [np.arange(len(s) - 1, dtype=np.int32) for s in seqs]
    d1 = hf_teacher.sample(seqs, positions, num_draws=64, seed=7)
    d2 = hf_teacher.sample(seqs, positions, num_draws=64, seed=7)
    d3 = hf_teacher.sample(seqs, positions, num_draws=64, seed=8)
    assert d1.shape == (13, 64) and d1.dtype == np.int32
    assert np.array_equal(d1, d2) and not np.array_equal(d1, d3)
    assert d1.min() >= 0 and d1.max() < hf_teacher.vocab_size


def test_hf_generate_is_greedy(hf_teacher: Any, tiny_lm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompts = _seqs(hf_teacher.vocab_size, [5, 8], seed=3)
    outs = hf_teacher.generate(prompts, max_new_tokens=4, eos_id=None)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir), dtype=torch.float32).eval()
    for p, o in zip(prompts, outs, strict=True):
        ref = model.generate(torch.as_tensor(p[None].astype(np.int64)), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)[0, len(p):].numpy()
        assert o.tolist() == ref.tolist()


def test_hf_classifier_logits(tiny_classifier_dir: Path, tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForSequenceClassification

    teacher = make_backend(TeacherSettings(model=str(tiny_classifier_dir), kind="classifier", device="cpu",
                                           batch_size=3, extra={"pad_token_id": tiny_tokenizer.pad_token_id}))
    seqs = _seqs(teacher.vocab_size, [4, 9, 6, 2], seed=4)
    logits = teacher.class_logits(seqs)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_classifier_dir)).eval()
    for s, row in zip(seqs, logits, strict=True):
        with torch.no_grad():
            ref = model(torch.as_tensor(s[None].astype(np.int64))).logits[0].numpy()
        np.testing.assert_allclose(row, ref, atol=1e-5)


def test_bad_settings_are_clear_errors(tiny_lm_dir: Path, hf_teacher: Any, tmp_path: Path) -> None:
    with pytest.raises(KdpipeError, match="--teacher"):
        make_backend(TeacherSettings(model=str(tmp_path / "missing")))
    with pytest.raises(KdpipeError, match="--load-in-4bit needs a CUDA GPU"):
        make_backend(TeacherSettings(model=str(tiny_lm_dir), device="cpu", load_in_4bit=True))
    with pytest.raises(KdpipeError, match="--top-k"):
        hf_teacher.topk(_seqs(hf_teacher.vocab_size, [4]), [np.arange(3, dtype=np.int32)], k=100_000)


@pytest.mark.vllm
def test_hf_and_vllm_agree(hf_teacher: Any, vllm_teacher: Any) -> None:
    """Same tiny float32 model: identical top-k sets except near-ties, log-probs within 1e-4."""
    k = 16
    seqs = _seqs(hf_teacher.vocab_size, [17, 5, 33, 2, 64], seed=5)
    positions = [np.arange(len(s), dtype=np.int32) for s in seqs]  # every position, the last included
    positions[2] = np.array([3, 4, 20, 31], dtype=np.int32)
    ids_h, lp_h = hf_teacher.topk(seqs, positions, k)
    ids_v, lp_v = vllm_teacher.topk(seqs, positions, k)
    assert ids_v.shape == ids_h.shape and ids_v.dtype == np.int32 and lp_v.dtype == np.float32
    np.testing.assert_allclose(lp_v, lp_h, atol=1e-4)
    for p in range(len(ids_h)):
        # A token may be in one top-k only when it ties with the k-th value (a near-tie at the boundary).
        only_h = ~np.isin(ids_h[p], ids_v[p])
        only_v = ~np.isin(ids_v[p], ids_h[p])
        assert np.all(np.abs(lp_h[p][only_h] - lp_h[p, -1]) < 1e-4)
        assert np.all(np.abs(lp_v[p][only_v] - lp_v[p, -1]) < 1e-4)
    gen_h = hf_teacher.generate(seqs[:2], max_new_tokens=5, eos_id=None)
    gen_v = vllm_teacher.generate(seqs[:2], max_new_tokens=5, eos_id=None)
    assert [g.tolist() for g in gen_h] == [g.tolist() for g in gen_v]
