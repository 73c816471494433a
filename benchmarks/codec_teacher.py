"""``benchmarks/codec.py --teacher DIR``: the topk id codings (1.0 ``planes`` vs 1.1 ``set``) on any local teacher.

Inputs, k = 64, rows of 256 tokens (255 target positions) cut from wikitext-2 *test*:
  * REAL: the teacher's exact float32 top-64 (``--arrays DIR`` keeps ids.npy / logprobs.npy /
    input_ids.npy there, and loads them instead of running the teacher when they exist);
  * SYNTHETIC fitted: ids drawn without replacement from a Zipf(s) law over a randomly permuted
    vocabulary, in draw order, with s fitted so that the ids' unigram entropy at the teacher's
    vocabulary matches the teacher's; the values are the teacher's own (positions shuffled). The same
    law at 262,144 ids (a Gemma-3-sized vocabulary) shows how the bytes grow with the vocabulary.
Every input is one shard of one record batch, as a dump unit of up to 256 such rows writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.codec import SEQ_LEN, bench_kdpipe_topk, column_breakdown, real_inputs
from benchmarks.common import print_table

K = 64
BIG_VOCAB = 262_144
ARRAYS = ("ids", "logprobs", "input_ids")


def teacher_inputs(teacher: str, num_rows: int, arrays: str | None) -> dict[str, Any]:
    """The teacher's top-64 over ``num_rows`` windows, from ``arrays`` when saved there before."""
    folder = Path(arrays) if arrays else None
    label = f"REAL {Path(teacher).name}"
    if folder is not None and all((folder / f"{a}.npy").is_file() for a in ARRAYS):
        saved = {a: np.load(folder / f"{a}.npy") for a in ARRAYS}
        if len(saved["input_ids"]) < num_rows:
            raise SystemExit(f"{folder} holds {len(saved['input_ids'])} rows; pass --rows <= that or another --arrays")
        n = num_rows * (SEQ_LEN - 1)
        from transformers import AutoConfig

        vocab = int(AutoConfig.from_pretrained(teacher).vocab_size)
        return {"label": label, "vocab": vocab, "input_ids": saved["input_ids"][:num_rows].astype(np.int32),
                "ids": saved["ids"][:n, :K].astype(np.int32), "logprobs": saved["logprobs"][:n, :K]}
    data = real_inputs(num_rows, 1, teacher=teacher, k=K)
    data["label"] = label
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for a in ARRAYS:
            np.save(folder / f"{a}.npy", data[a])
    return data


def unigram_bits(ids: np.ndarray) -> float:
    counts = np.bincount(ids.reshape(-1))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def zipf_sets(vocab: int, s: float, n: int, seed: int) -> np.ndarray:
    """[n, K] distinct Zipf(s) ranks per position, in draw order (frequent ranks tend to come first)."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** s)
    cdf /= cdf[-1]
    out = np.empty((n, K), np.int64)
    draws = 16 * K
    for a in range(0, n, 2048):
        x = np.minimum(np.searchsorted(cdf, rng.random((min(2048, n - a), draws))), vocab - 1)
        order = np.argsort(x, axis=1, kind="stable")
        xs = np.take_along_axis(x, order, axis=1)
        first = np.ones_like(xs, dtype=bool)
        first[:, 1:] = xs[:, 1:] != xs[:, :-1]
        keep = np.zeros_like(first)
        np.put_along_axis(keep, order, first, axis=1)
        # The first K distinct draws of each position, in the order they were drawn.
        pos = np.sort(np.where(keep, np.arange(draws)[None, :], draws), axis=1)[:, :K]
        if (pos >= draws).any():
            raise SystemExit(f"Zipf s={s:.3f} over {vocab} ids gives fewer than {K} distinct ids in {draws} draws")
        out[a:a + len(x)] = np.take_along_axis(x, pos, axis=1)
    return out


def fit_zipf(data: dict[str, Any]) -> float:
    """The Zipf exponent whose id sets have the teacher's unigram entropy at the teacher's vocabulary."""
    step = max(1, len(data["ids"]) // 3000)  # the entropy of a sample grows with its size: compare like sizes
    target, lo, hi = unigram_bits(data["ids"][::step][:3000]), 0.5, 1.6
    for _ in range(12):
        s = (lo + hi) / 2
        lo, hi = (s, hi) if unigram_bits(zipf_sets(data["vocab"], s, 3000, 1)) > target else (lo, s)
    return (lo + hi) / 2


def fitted_synthetic(data: dict[str, Any], vocab: int, s: float) -> dict[str, Any]:
    rng = np.random.default_rng(vocab)
    n = len(data["ids"])
    ids = rng.permutation(vocab)[zipf_sets(vocab, s, n, vocab)].astype(np.int32)
    return {"label": f"SYNTHETIC fitted Zipf s={s:.3f}, {vocab:,} vocab", "vocab": vocab, "ids": ids,
            "logprobs": data["logprobs"][rng.permutation(n)],
            "input_ids": rng.integers(0, vocab, size=data["input_ids"].shape).astype(np.int32)}


def run(teacher: str, num_rows: int, repeats: int, arrays: str | None) -> dict[str, Any]:
    """Measure and print; returns the rows for --json."""
    data = teacher_inputs(teacher, num_rows, arrays)
    s = fit_zipf(data)
    inputs = [data, fitted_synthetic(data, data["vocab"], s), fitted_synthetic(data, BIG_VOCAB, s)]
    results, columns = [], []
    for d in inputs:
        pair = {c: bench_kdpipe_topk(d, K, repeats, id_coding=c) for c in ("planes", "set")}
        for c, r in pair.items():
            r["id_coding"] = c
            for key in ("bytes_per_token", "encode_tokens_per_s", "decode_tokens_per_s"):
                r[f"{key} vs planes"] = r[key] / pair["planes"][key]
            results.append(r)
        per = {c: {x["column"]: x["bytes_per_token"] for x in column_breakdown(d, K, c)} for c in pair}
        columns += [{"input": d["label"], "column": name, "planes": per["planes"].get(name, "–"),
                     "set": per["set"].get(name, "–")} for name in dict.fromkeys([*per["planes"], *per["set"]])]
    set_b = [r["bytes_per_token"] for r in results if r["id_coding"] == "set"]
    ratios = {"262k synthetic / teacher": set_b[2] / set_b[0], "262k synthetic / own-vocab synthetic": set_b[2] / set_b[1]}
    print(f"\n## topk id codings, k={K}: {inputs[0]['label']} (vocab {data['vocab']:,}), {len(data['ids']):,} positions "
          f"per input (tokens/s from process CPU time, one thread, median of {repeats})\n")
    print_table(results, ["input", "id_coding", "bytes_per_token", "kl_nats", "encode_tokens_per_s",
                          "decode_tokens_per_s", "bytes_per_token vs planes", "encode_tokens_per_s vs planes",
                          "decode_tokens_per_s vs planes"])
    print("\n## bytes per token of each column (serialized alone, zstd level 3)\n")
    print_table(columns, ["input", "column", "planes", "set"])
    print("\n## id_coding set: bytes per token, 262,144-id synthetic vs 49k-class inputs\n")
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    return {"id_codings": results, "columns": columns, "vocab_ratios": ratios, "zipf_s": s}
