"""Small builders shared by the cache_format tests (numpy only, deterministic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cache_format import (
    CacheIdentity,
    CacheWriter,
    ClassLogitsBatch,
    ClassLogitsEncoding,
    SampledBatch,
    SampledEncoding,
    TopKBatch,
    TopKEncoding,
)
from cache_format.encodings import Encoding

VOCAB = 1000


def identity(encoding: Encoding | None = None, vocab: int = VOCAB, *, model_vocab: int | None = None,
             tokenizer_name: str = "toy-tok", tokenizer_fingerprint: str = "sha256:00", task: str = "lm",
             max_length: int = 64, run: dict[str, Any] | None = None) -> CacheIdentity:
    """The one toy identity of the tests and benchmarks: a ``topk`` k=8 cache over a ``vocab``-token tokenizer.

    ``model_vocab`` is the model's (possibly padded) vocab, default ``vocab``; ``run`` is informational.
    """
    return CacheIdentity(
        teacher={"name": "toy-teacher", "revision": "r1", "dtype": "float32", "backend": "hf",
                 "backend_version": "0"},
        tokenizer={"name": tokenizer_name, "vocab_size": vocab,
                   "model_vocab_size": vocab if model_vocab is None else model_vocab,
                   "fingerprint": tokenizer_fingerprint},
        recipe={"task": task, "template": None, "max_length": max_length, "fields": {"text": "text"}},
        dataset={"name": "toy", "config": None, "split": "train", "fingerprint": "abc", "num_rows": 10},
        encoding=encoding if encoding is not None else TopKEncoding(k=8),
        run=dict(run or {}),
    )


def topk_from_logits(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k ids and log-probs (descending) of float64 logits [n, V]."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    return ids.astype(np.int32), np.take_along_axis(logp, ids, axis=1).astype(np.float32)


def topk_batch(sample_ids: list[str], *, k: int = 8, vocab: int = VOCAB, length: int = 12, seed: int = 0,
               scale: float = 3.0) -> TopKBatch:
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(0, vocab, length).astype(np.int32) for _ in sample_ids]
    positions = [np.arange(max(length - 1, 0), dtype=np.int32) for _ in sample_ids]
    n = sum(len(p) for p in positions)
    ids, lps = topk_from_logits(rng.standard_normal((n, vocab)) * scale, k)
    return TopKBatch(sample_ids=sample_ids, input_ids=inputs, positions=positions, ids=ids, logprobs=lps)


def sampled_batch(sample_ids: list[str], *, num_draws: int = 16, vocab: int = VOCAB, length: int = 12,
                  seed: int = 0) -> SampledBatch:
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(0, vocab, length).astype(np.int32) for _ in sample_ids]
    positions = [np.arange(max(length - 1, 0), dtype=np.int32) for _ in sample_ids]
    n = sum(len(p) for p in positions)
    draws = (rng.zipf(1.5, size=(n, num_draws)) % vocab).astype(np.int32)
    return SampledBatch(sample_ids=sample_ids, input_ids=inputs, positions=positions, draws=draws)


def class_batch(sample_ids: list[str], *, num_classes: int = 3, seed: int = 0) -> ClassLogitsBatch:
    rng = np.random.default_rng(seed)
    return ClassLogitsBatch(sample_ids=sample_ids, logits=rng.standard_normal((len(sample_ids), num_classes)),
                            labels=[i % num_classes for i in range(len(sample_ids))])


def write_topk_cache(root: Path, *, units: int = 3, rows_per_unit: int = 4, k: int = 8, seed: int = 0,
                     finalize: bool = True, **writer_kw: object) -> Path:
    with CacheWriter(root, identity(TopKEncoding(k=k)), **writer_kw) as w:  # type: ignore[arg-type]
        for u in range(units):
            w.write(topk_batch([f"u{u}-r{i}" for i in range(rows_per_unit)], k=k, seed=seed + u))
            w.end_unit(u)
        if finalize:
            w.finalize()
    return root


def make_sampled_identity(num_draws: int = 16) -> CacheIdentity:
    return identity(SampledEncoding(num_draws=num_draws))


def make_class_identity(num_classes: int = 3) -> CacheIdentity:
    return identity(ClassLogitsEncoding(num_classes=num_classes, labels=[f"c{i}" for i in range(num_classes)]))
