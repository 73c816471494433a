"""Hidden-state capture: the teacher's own head from its checkpoint, one pass for several encodings,
the capture temperature, and vLLM's pooling runner against the HF backend (top-k, draws, class logits).

vLLM engines: one hidden-capture engine and one classifier engine for this module (each start
costs seconds to a minute of CI); the logprobs engine is the session's ``vllm_teacher``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.dump.teachers import TeacherSettings, make_backend
from pipeline.dump.teachers.base import Want
from pipeline.dump.teachers.head import load_output_head, postprocessed
from pipeline.dump.teachers.vllm import cut_trailing_pad
from pipeline.errors import KdpipeError


def _seqs(vocab: int, lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(4, vocab, size=n - 1)]).astype(np.int32) for n in lengths]


def _mixed_positions(seqs: list[np.ndarray]) -> list[np.ndarray]:
    """Every position (the last included), one sparse row and one row with no target."""
    positions = [np.arange(len(s), dtype=np.int32) for s in seqs]
    positions[2] = np.array([3, 4, 20, 31], dtype=np.int32)
    positions[3] = np.zeros(0, dtype=np.int32)
    return positions


# Session scope, like ``vllm_teacher``: tearing a vLLM engine down resets vLLM's process-global
# parallel groups, which breaks every other engine still alive in this pytest process.
@pytest.fixture(scope="session")
def vllm_hidden(tiny_lm_dir: Path) -> Iterator[Any]:
    """The tiny LM behind vLLM's pooling runner; batch_size 4 like the session's ``hf_teacher``."""
    backend = make_backend(TeacherSettings(model=str(tiny_lm_dir), backend="vllm", dtype="float32", max_length=256,
                                           batch_size=4, enforce_eager=True, vllm_capture="hidden"))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vllm_classifier(tiny_classifier_dir: Path) -> Iterator[Any]:
    backend = make_backend(TeacherSettings(model=str(tiny_classifier_dir), backend="vllm", kind="classifier",
                                           dtype="float32", max_length=256, enforce_eager=True))
    yield backend
    backend.close()


# ----------------------------------------------------------------------------- the head, without vLLM


def _tied_llama(out: Path, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(out), max_shard_size="40KB")  # sharded: read through the index
    return model


def test_output_head_from_checkpoint(tiny_lm_dir: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    h = torch.randn(5, 64)
    untied = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir), dtype=torch.float32).eval()
    tied = _tied_llama(tmp_path / "tied", tiny_tokenizer)
    assert (tmp_path / "tied" / "model.safetensors.index.json").is_file()
    for folder, model in ((tiny_lm_dir, untied), (tmp_path / "tied", tied)):
        head, rows = load_output_head(str(folder), revision=None, trust_remote_code=False, device="cpu",
                                      dtype=torch.float32)
        assert rows == model.config.vocab_size
        with torch.no_grad():
            torch.testing.assert_close(head(h), model.lm_head(h), rtol=0, atol=0)
    capped = postprocessed(lambda x: x * 10, SimpleNamespace(final_logit_softcapping=5.0, logit_scale=0.5))
    torch.testing.assert_close(capped(torch.tensor([1.0])), torch.tanh(torch.tensor([5.0 / 5.0])) * 5.0)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((tiny_lm_dir / "config.json").read_text())
    with pytest.raises(KdpipeError, match="no safetensors weights"):
        load_output_head(str(tmp_path / "bare"), revision=None, trust_remote_code=False, device="cpu",
                         dtype=torch.float32)


def test_hf_one_pass_equals_separate_passes_and_applies_temperature(hf_teacher: Any, tiny_lm_dir: Path,
                                                                    tiny_tokenizer: Any) -> None:
    seqs = _seqs(hf_teacher.vocab_size, [9, 4, 33, 7, 12], seed=1)
    positions = _mixed_positions(seqs)
    got = hf_teacher.capture(seqs, positions, Want(top_k=8, num_draws=16, seed=5))
    ids, lps = hf_teacher.topk(seqs, positions, 8)
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_array_equal(got.logprobs, lps)
    np.testing.assert_array_equal(got.draws, hf_teacher.sample(seqs, positions, 16, 5))
    hot = make_backend(TeacherSettings(model=str(tiny_lm_dir), device="cpu", batch_size=4, temperature=2.0,
                                       extra={"pad_token_id": tiny_tokenizer.pad_token_id}))
    _, hot_lps = hot.topk(seqs[:1], positions[:1], 8)
    with torch.no_grad():
        logits = hot.model(torch.as_tensor(seqs[0][None].astype(np.int64))).logits[0].float()
    ref = torch.log_softmax(logits / 2.0, -1).topk(8).values.numpy()
    np.testing.assert_allclose(hot_lps, ref, atol=1e-5)


# ----------------------------------------------------------------------------- vLLM against HF


def _assert_topk_agree(ids_h: np.ndarray, lp_h: np.ndarray, ids_v: np.ndarray, lp_v: np.ndarray) -> None:
    assert ids_v.shape == ids_h.shape and ids_v.dtype == np.int32 and lp_v.dtype == np.float32
    np.testing.assert_allclose(lp_v, lp_h, atol=1e-4)
    for p in range(len(ids_h)):
        # A token may be in one top-k only when it ties with the k-th value (a near-tie at the boundary).
        only_h = ~np.isin(ids_h[p], ids_v[p])
        assert np.all(np.abs(lp_h[p][only_h] - lp_h[p, -1]) < 1e-4)


@pytest.mark.vllm
def test_hidden_capture_equals_hf(hf_teacher: Any, vllm_hidden: Any) -> None:
    """Top-k within 1e-4 nats; draws with the same seed equal draw for draw; one pass == two passes."""
    seqs = _seqs(hf_teacher.vocab_size, [17, 5, 33, 2, 64, 40, 9], seed=5)
    positions = _mixed_positions(seqs)
    want = Want(top_k=16, num_draws=32, seed=11)
    h, v = hf_teacher.capture(seqs, positions, want), vllm_hidden.capture(seqs, positions, want)
    _assert_topk_agree(h.ids, h.logprobs, v.ids, v.logprobs)
    assert v.draws.shape == h.draws.shape == (sum(len(p) for p in positions), 32) and v.draws.dtype == np.int32
    # Equal log-probs (within float32 rounding) reach the same seeded draws: a draw can differ only
    # when its uniform falls within rounding of a CDF step (rare: ~1e-4 of draws at most).
    assert (v.draws == h.draws).mean() >= 0.999
    np.testing.assert_array_equal(vllm_hidden.sample(seqs, positions, 32, 11), v.draws)
    assert vllm_hidden.timing.teacher_s > 0


@pytest.mark.vllm
def test_hidden_draws_follow_hf_distribution(hf_teacher: Any, vllm_hidden: Any, tiny_lm_dir: Path) -> None:
    """Chi-square of vLLM's draw counts against HF's full distribution (16 equal-mass bins per position)."""
    from transformers import AutoModelForCausalLM

    seqs = _seqs(hf_teacher.vocab_size, [24], seed=8)
    positions = [np.arange(24, dtype=np.int32)]
    draws = vllm_hidden.sample(seqs, positions, 255, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.as_tensor(seqs[0][None].astype(np.int64))).logits[0].double(), -1).numpy()
    stat, bins = 0.0, 16
    for t in range(24):
        order = np.argsort(-probs[t])
        groups = np.minimum((np.cumsum(probs[t][order]) * bins).astype(int), bins - 1)
        group_of = np.empty_like(groups)
        group_of[order] = groups
        expected = np.bincount(groups, weights=probs[t][order], minlength=bins) * 255
        observed = np.bincount(group_of[draws[t]], minlength=bins)
        keep = expected > 0
        stat += float((((observed - expected) ** 2)[keep] / expected[keep]).sum())
    df = 24 * (bins - 1)
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))
    assert p_value > 1e-3, (stat, df)


@pytest.mark.vllm
def test_hidden_capture_temperature(hf_teacher: Any, vllm_hidden: Any) -> None:
    seqs = _seqs(hf_teacher.vocab_size, [12, 20], seed=6)
    positions = [np.arange(len(s), dtype=np.int32) for s in seqs]
    hf_teacher.settings.temperature = vllm_hidden.settings.temperature = 0.5
    try:
        ids_h, lp_h = hf_teacher.topk(seqs, positions, 8)
        ids_v, lp_v = vllm_hidden.topk(seqs, positions, 8)
    finally:
        hf_teacher.settings.temperature = vllm_hidden.settings.temperature = 1.0
    _assert_topk_agree(ids_h, lp_h, ids_v, lp_v)
    _, lp_1 = vllm_hidden.topk(seqs, positions, 8)
    assert np.abs(lp_v - lp_1).max() > 0.01  # the temperature did change the distribution


@pytest.mark.vllm
def test_each_capture_refuses_what_it_cannot_do(vllm_teacher: Any, vllm_hidden: Any) -> None:
    seqs = _seqs(vllm_teacher.vocab_size, [6])
    positions = [np.arange(5, dtype=np.int32)]
    with pytest.raises(KdpipeError, match="--vllm-capture hidden"):
        vllm_teacher.sample(seqs, positions, 4, seed=0)
    with pytest.raises(KdpipeError, match="cannot generate"):
        vllm_hidden.generate(seqs, max_new_tokens=2, eos_id=None)
    with pytest.raises(KdpipeError, match="--top-k"):
        vllm_hidden.topk(seqs, positions, 100_000)


@pytest.mark.vllm
def test_vllm_class_logits_equal_hf(vllm_classifier: Any, tiny_classifier_dir: Path, tiny_tokenizer: Any) -> None:
    hf = make_backend(TeacherSettings(model=str(tiny_classifier_dir), kind="classifier", device="cpu", batch_size=3,
                                      extra={"pad_token_id": tiny_tokenizer.pad_token_id}))
    seqs = _seqs(hf.vocab_size, [4, 9, 6, 2, 30], seed=4)
    pad = tiny_tokenizer.pad_token_id
    seqs[1] = np.concatenate([seqs[1], [pad, pad]]).astype(np.int32)  # HF scores the last token that is not pad
    logits = vllm_classifier.class_logits(seqs)
    assert logits.shape == (5, 2) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, hf.class_logits(seqs), atol=1e-4)
    assert cut_trailing_pad(np.array([pad, pad]), pad).tolist() == [pad]
    with pytest.raises(KdpipeError, match="classifier"):
        vllm_classifier.topk(seqs, [np.arange(3, dtype=np.int32)] * 5, 4)


# ----------------------------------------------------------------------------- dumps: every encoding, one pass


def _cfg(model: Path, data: Path, out: Path, backend: str, **kw: Any) -> Any:
    from pipeline.dump.run import DumpConfig

    base: dict[str, Any] = {"teacher": str(model), "dataset": str(data), "out": str(out), "backend": backend,
                            "top_k": 16, "num_draws": 16, "max_length": 48, "unit_rows": 4, "unit_bytes": 256,
                            "batch_size": 4, "device": "cpu", "progress": False, "seed": 9}
    return DumpConfig(**{**base, **kw})


def _rows(path: Path) -> list[Any]:
    from cache_format import open_cache, verify_cache

    assert verify_cache(str(path))["ok"]
    return list(open_cache(str(path)).iter_rows())


def _row_pairs(a: Path, b: Path) -> list[tuple[Any, Any]]:
    """The rows of two caches side by side; same samples, same target positions."""
    ra, rb = _rows(a), _rows(b)
    assert [r.sample_id for r in ra] == [r.sample_id for r in rb]
    for x, y in zip(ra, rb, strict=True):
        np.testing.assert_array_equal(x.positions, y.positions)
    return list(zip(ra, rb, strict=True))


def _compare_topk(a: Path, b: Path) -> None:
    same = total = 0
    for x, y in _row_pairs(a, b):
        same += int((x.ids == y.ids).sum())
        total += x.ids.size
        # Stored values are quantized (1/8 nat): a 1e-5 difference may cross one step.
        assert np.abs(x.logprobs - y.logprobs).max() <= 0.125 + 1e-3
    assert same / total > 0.99


def _same_draw_share(a: Path, b: Path) -> float:
    """Share of stored draws that agree between two sampled caches (per position: unique ids with counts)."""
    differ = total = 0
    for x, y in _row_pairs(a, b):
        for t in range(len(x.positions)):
            cx = np.bincount(x.ids[t], weights=x.counts[t], minlength=1 << 16)
            cy = np.bincount(y.ids[t], weights=y.counts[t], minlength=1 << 16)
            differ += int(np.abs(cx - cy).sum()) // 2  # a draw that moved leaves one id and lands on another
            total += int(x.counts[t].sum())
    return 1 - differ / total


def test_out_sampled_equals_two_dumps_and_resumes_only_the_missing_cache(tiny_lm_dir: Path, data_dir: Path,
                                                                          tmp_path: Path, same_content: Any) -> None:
    """HF: --out-sampled writes the caches two separate dumps write; a cache already done is left alone."""
    from cache_format import open_cache
    from pipeline.dump.run import run_dump

    data = data_dir / "wiki.txt"
    topk, sampled = tmp_path / "topk", tmp_path / "sampled"
    run_dump(_cfg(tiny_lm_dir, data, topk, "hf", limit=12))
    run_dump(_cfg(tiny_lm_dir, data, sampled, "hf", limit=12, encoding="sampled"))
    a, b = tmp_path / "a", tmp_path / "b"
    run_dump(_cfg(tiny_lm_dir, data, a, "hf", limit=12))  # a crash after --out's last unit, before --out-sampled's
    before = json.loads((a / "manifest.json").read_text())["shards"]
    s = run_dump(_cfg(tiny_lm_dir, data, a, "hf", limit=12, out_sampled=str(b)))
    assert json.loads((a / "manifest.json").read_text())["shards"] == before and s["units_done"] > 0
    assert s["capture"] == "hf" and [o["out"] for o in s["also_written"]] == [str(b)]
    same_content(a, topk)
    same_content(b, sampled)
    assert open_cache(str(b)).manifest.identity.diff(open_cache(str(sampled)).manifest.identity) == []
    assert (tmp_path / "b.config.yaml").is_file()


@pytest.mark.vllm
def test_vllm_dumps_every_encoding_like_hf_in_one_pass(vllm_hidden: Any, tiny_lm_dir: Path, data_dir: Path,
                                                        tmp_path: Path, same_content: Any) -> None:
    from cache_format import open_cache
    from pipeline.dump.run import run_dump

    data = data_dir / "wiki.txt"
    run_dump(_cfg(tiny_lm_dir, data, tmp_path / "hf_topk", "hf", out_sampled=str(tmp_path / "hf_sampled")))
    s = run_dump(_cfg(tiny_lm_dir, data, tmp_path / "vl_topk", "vllm", out_sampled=str(tmp_path / "vl_sampled")),
                 backend=vllm_hidden)
    assert s["capture"] == "vllm:hidden" and s["teacher_s"] > 0 and len(s["also_written"]) == 1
    for name in ("vl_topk", "vl_sampled"):
        ident = open_cache(str(tmp_path / name)).manifest.identity
        assert ident.teacher["backend"] == "vllm" and ident.run["vllm_capture"] == "hidden"
    _compare_topk(tmp_path / "hf_topk", tmp_path / "vl_topk")
    # Draw for draw, but for the rare draw whose uniform falls within float32 rounding of a CDF step
    # (measured: 1 of 7,536 draws moved to the neighbouring token id).
    assert _same_draw_share(tmp_path / "hf_sampled", tmp_path / "vl_sampled") >= 0.999
    # One pass, two writers == two separate dumps (the same engine: bit for bit).
    run_dump(_cfg(tiny_lm_dir, data, tmp_path / "topk", "vllm", vllm_capture="hidden"), backend=vllm_hidden)
    run_dump(_cfg(tiny_lm_dir, data, tmp_path / "sampled", "vllm", encoding="sampled"), backend=vllm_hidden)
    same_content(tmp_path / "vl_topk", tmp_path / "topk")
    same_content(tmp_path / "vl_sampled", tmp_path / "sampled")
    with pytest.raises(KdpipeError, match="--vllm-capture logprobs"):
        run_dump(_cfg(tiny_lm_dir, data, tmp_path / "x", "vllm", vllm_capture="logprobs"), backend=vllm_hidden)


@pytest.mark.vllm
def test_vllm_classification_dump_equals_hf(vllm_classifier: Any, tiny_classifier_dir: Path, data_dir: Path,
                                            tmp_path: Path) -> None:
    from pipeline.dump.run import run_dump

    kw = {"task": "classification", "limit": 10}
    run_dump(_cfg(tiny_classifier_dir, data_dir / "sst2.train", tmp_path / "hf", "hf", **kw))
    s = run_dump(_cfg(tiny_classifier_dir, data_dir / "sst2.train", tmp_path / "vl", "vllm", **kw),
                 backend=vllm_classifier)
    assert s["capture"] == "vllm:hidden"
    pairs = _row_pairs(tmp_path / "hf", tmp_path / "vl")
    assert len(pairs) == 10
    for x, y in pairs:
        assert x.label == y.label
        np.testing.assert_allclose(x.class_logits, y.class_logits, atol=1e-4)
