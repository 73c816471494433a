"""Caches for the training tests, written directly through ``cache_format.CacheWriter``.

``write_teacher_cache`` runs a tiny teacher forward pass (no dump stage needed);
``write_random_cache`` makes valid random top-k / sampled / class-logit caches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache_format import (
    CacheIdentity,
    CacheWriter,
    ClassLogitsBatch,
    ClassLogitsEncoding,
    SampledBatch,
    SampledEncoding,
    TopKBatch,
    TopKEncoding,
    tokenizer_fingerprint,
)
from helpers.cache import identity


def one_torch_thread() -> Any:
    """Fixture body: 1 torch thread for the module, restored afterwards.

    Tiny models gain nothing from intra-op threads, and on a shared 2-core CI box the threads'
    spin-waiting makes each small matmul 10x slower.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def identity_for(tokenizer: Any, encoding: Any, vocab_size: int | None = None, task: str = "lm") -> CacheIdentity:
    """The toy identity of ``helpers.cache`` for a real (tiny) tokenizer."""
    return identity(encoding, len(tokenizer), model_vocab=vocab_size or len(tokenizer), tokenizer_name="tiny-tok",
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), task=task, max_length=32)


def tokenize(tokenizer: Any, texts: list[str], max_len: int) -> list[np.ndarray]:
    return [np.asarray(tokenizer(t)["input_ids"][:max_len], dtype=np.int32) for t in texts]


def write_teacher_cache(root: Path, teacher_dir: Path, tokenizer: Any, texts: list[str], *, k: int = 16,
                        max_len: int = 24, rows_per_unit: int = 16, max_shard_rows: int = 10_000) -> Path:
    """Top-k cache of a real (tiny) teacher's next-token distributions over ``texts``."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    rows = [r for r in tokenize(tokenizer, texts, max_len) if len(r) >= 3]
    ident = identity_for(tokenizer, TopKEncoding(k=k), vocab_size=teacher.config.vocab_size)
    with CacheWriter(root, ident, max_shard_rows=max_shard_rows) as w:
        for unit, start in enumerate(range(0, len(rows), rows_per_unit)):
            chunk = rows[start:start + rows_per_unit]
            ids_l, lps_l, pos_l = [], [], []
            for r in chunk:
                with torch.no_grad():
                    logp = torch.log_softmax(teacher(torch.as_tensor(r[None]).long()).logits[0].double(), -1)
                vals, ids = logp[:-1].topk(k, -1)  # position t predicts r[t+1]; the last one has no label
                ids_l.append(ids.numpy().astype(np.int32))
                lps_l.append(vals.numpy().astype(np.float32))
                pos_l.append(np.arange(len(r) - 1, dtype=np.int32))
            w.write(TopKBatch(sample_ids=[f"s{start + i}" for i in range(len(chunk))], input_ids=chunk,
                              positions=pos_l, ids=np.concatenate(ids_l), logprobs=np.concatenate(lps_l)))
            w.end_unit(unit)
        w.finalize()
    return root


def write_random_cache(root: Path, tokenizer: Any, *, kind: str = "topk", rows: int = 24, length: int = 10,
                       k: int = 8, vocab_size: int | None = None, num_classes: int = 2, max_shard_rows: int = 10_000,
                       seed: int = 0, rows_per_unit: int = 8) -> Path:
    """A valid cache of random distributions; ``rows=0`` gives an empty (finalized) cache."""
    rng = np.random.default_rng(seed)
    V = vocab_size or len(tokenizer)
    if kind == "topk":
        enc: Any = TopKEncoding(k=k)
    elif kind == "sampled":
        enc = SampledEncoding(num_draws=32)
    else:
        enc = ClassLogitsEncoding(num_classes=num_classes)
    ident = identity_for(tokenizer, enc, vocab_size=V, task="classification" if kind == "class_logits" else "lm")
    with CacheWriter(root, ident, max_shard_rows=max_shard_rows) as w:
        for unit, start in enumerate(range(0, rows, rows_per_unit)):  # each unit becomes >= 1 shard
            n = min(rows_per_unit, rows - start)
            sids = [f"r{start + i}" for i in range(n)]
            inputs = [rng.integers(4, len(tokenizer), length).astype(np.int32) for _ in range(n)]
            positions = [np.arange(length - 1, dtype=np.int32) for _ in range(n)]
            P = n * (length - 1)
            if kind == "topk":
                logits = rng.standard_normal((P, V)) * 3
                logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
                ids = np.argsort(-logp, axis=1)[:, :k].astype(np.int32)
                w.write(TopKBatch(sids, inputs, positions, ids, np.take_along_axis(logp, ids, 1).astype(np.float32)))
            elif kind == "sampled":
                w.write(SampledBatch(sids, inputs, positions, (rng.zipf(1.5, (P, 32)) % V).astype(np.int32)))
            else:
                w.write(ClassLogitsBatch(sids, rng.standard_normal((n, num_classes)).astype(np.float32),
                                         labels=[int(x) for x in rng.integers(0, num_classes, n)], input_ids=inputs))
            w.end_unit(unit)
        w.finalize()
    return root


def build_trained_teacher(out: Path, tokenizer: Any, texts: list[str], steps: int = 40) -> Path:
    """The tiny Llama (2 layers, width 64) trained a few steps so its distributions are peaked."""
    from pipeline.demo.toy import build_llama, token_stream, train_causal_lm

    model = build_llama(len(tokenizer), tokenizer=tokenizer, seed=0)
    train_causal_lm(model, token_stream(tokenizer, texts), steps=steps, batch_size=8, seq_len=32, lr=1e-2)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def student_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))
