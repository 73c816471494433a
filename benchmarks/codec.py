"""Codec benchmark: bytes per token, fidelity (KL) and single-core encode/decode speed.

Inputs (the output says which is which):
  * REAL: a forward pass of ``benchmarks.common.wikitext_teacher()`` (4-layer Llama, BPE vocab
    ~32k, trained briefly on wikitext-2 valid) over wikitext-2 *test* text, float32 log-softmax,
    ``torch.topk`` — the distributions a dump would store.
  * SYNTHETIC: a 150k vocabulary with Zipf-distributed top-k ids (randomly permuted, so id order
    carries no frequency information) and heavy-tailed log-prob shapes.

Rows: the kdpipe ``topk`` codec (1.1 ``set`` id coding; 1.0 ``planes`` too at k = 64) at k = 16,
64, 128 and ``sampled``; baselines in the same run: int32 ids + float32 log-probs in Arrow
(uncompressed and zstd) and int32 + bfloat16 (zstd). Every row stores the same
``sample_id``/``input_ids``/``positions`` columns, so bytes compare like for like. Speeds are
single-threaded (numpy/BLAS/Arrow limited to one thread), median of ``--repeats`` runs.

``--teacher DIR`` instead compares the two topk id codings on any local HF teacher (and on
synthetic vocabularies fitted to it, up to 262,144 ids): see ``benchmarks/codec_teacher.py``. Usage::

    .venv/bin/python -m benchmarks.codec --quick                 # ~1 min
    .venv/bin/python -m benchmarks.codec --json codec.json       # the toy-teacher table
    .venv/bin/python -m benchmarks.codec --teacher DIR --rows 200 --arrays DIR/topk64 --json idcoding.json
"""

from __future__ import annotations

import os

# Single core: set before numpy/pyarrow/torch load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks.common import print_table, wikitext_lines, wikitext_teacher  # noqa: E402
from cache_format import SampledBatch, SampledEncoding, TopKBatch, TopKEncoding  # noqa: E402
from cache_format.encodings import check_batch  # noqa: E402
from cache_format.shard import (  # noqa: E402
    build_table,
    decode_batch,
    read_shard_encoding,
    serialize_table,
    shard_encoding,
)
from cache_format.writer import DEFAULT_COMPRESSION_LEVEL  # noqa: E402

# The tests' toy identity (tests/ is a namespace package from the repo root); only the vocab and the
# encoding reach the shard bytes measured here.
from tests.helpers.cache import identity  # noqa: E402

pa.set_cpu_count(1)
pa.set_io_thread_count(1)

SEQ_LEN = 256  # tokens per row: a typical short LM chunk; rows carry SEQ_LEN - 1 target positions
MAX_K = 128


# ---------------------------------------------------------------- inputs


def real_inputs(num_rows: int, num_draws: int, seed: int = 0, teacher: str | None = None,
                k: int = MAX_K) -> dict[str, Any]:
    """Top-k ids/log-probs and ``num_draws`` samples per position from ``teacher`` (default: the wikitext teacher)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    path = teacher or wikitext_teacher()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    stream: list[int] = []
    for line in wikitext_lines("test"):
        stream.extend(tok(line)["input_ids"])
        if len(stream) >= num_rows * SEQ_LEN:
            break
    rows = np.asarray(stream[: num_rows * SEQ_LEN], dtype=np.int64).reshape(-1, SEQ_LEN)
    ids, lps, draws = [], [], []
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            x = torch.as_tensor(rows[start:start + 8])
            logits = model(input_ids=x).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
            top = torch.topk(logp, k, dim=-1)
            ids.append(top.indices.to(torch.int32).numpy())
            lps.append(top.values.numpy())
            draws.append(torch.multinomial(logp.exp(), num_draws, replacement=True, generator=gen)
                         .to(torch.int32).numpy())
    return {"label": "REAL wikitext-2 teacher", "vocab": int(model.config.vocab_size), "input_ids": rows.astype(np.int32),
            "ids": np.concatenate(ids), "logprobs": np.concatenate(lps), "draws": np.concatenate(draws)}


def synthetic_inputs(num_rows: int, num_draws: int, vocab: int = 150_000, seed: int = 0) -> dict[str, Any]:
    """Zipf ids (permuted), heavy-tailed log-prob shapes; clearly not a real model."""
    rng = np.random.default_rng(seed)
    n = num_rows * (SEQ_LEN - 1)
    perm = rng.permutation(vocab).astype(np.int32)
    ranks = np.minimum(rng.zipf(1.1, size=(n, MAX_K)) - 1, vocab - 1)
    # Make ids distinct within a position: duplicates get fresh uniform ranks (a few rounds suffice).
    for _ in range(8):
        s = np.sort(ranks, axis=1)
        dup = np.zeros_like(ranks, dtype=bool)
        order = np.argsort(ranks, axis=1)
        dup_sorted = np.zeros_like(s, dtype=bool)
        dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        if not dup.any():
            break
        ranks[dup] = rng.integers(0, vocab, int(dup.sum()))
    temp = rng.uniform(0.5, 3.0, size=(n, 1))
    logits = -temp * np.log1p(np.arange(MAX_K))[None, :] + rng.normal(0, 0.3, size=(n, MAX_K))
    logits = -np.sort(-logits, axis=1)
    tail_mass = rng.beta(1.0, 4.0, size=(n, 1))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True) * (1 - tail_mass)
    lps = np.log(p).astype(np.float32)
    pd = np.exp(lps.astype(np.float64))
    pd /= pd.sum(axis=1, keepdims=True)
    cdf = np.cumsum(pd, axis=1)
    u = rng.random((n, num_draws))
    picks = np.minimum((u[:, :, None] > cdf[:, None, :]).sum(axis=2), MAX_K - 1)
    draws = np.take_along_axis(perm[ranks], picks, axis=1)
    return {"label": f"SYNTHETIC Zipf {vocab // 1000}k vocab", "vocab": vocab,
            "input_ids": rng.integers(0, vocab, size=(num_rows, SEQ_LEN)).astype(np.int32),
            "ids": perm[ranks], "logprobs": lps, "draws": draws.astype(np.int32)}


# ---------------------------------------------------------------- helpers


def timed(fn: Any, repeats: int) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of ``fn()`` over ``repeats`` runs after one warm-up.

    Everything runs on one thread, so process CPU time is the time one core spent; on a shared
    machine it is far less noisy than wall time (which is reported too).
    """
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return float(np.median(cpu)), float(np.median(wall))


def row_lists(data: dict[str, Any]) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    rows = data["input_ids"]
    return ([f"r{i}" for i in range(len(rows))], list(rows),
            [np.arange(SEQ_LEN - 1, dtype=np.int32) for _ in range(len(rows))])


def read_all(blob: bytes) -> list[Any]:
    """Every decoded row of a shard (kept in memory: for checking fidelity)."""
    return [row for batch in stream_batches(blob) for row in batch]


def stream_batches(blob: bytes) -> Any:
    """Decoded rows one record batch at a time, as a streaming reader hands them to a trainer."""
    reader = pa.ipc.open_file(pa.BufferReader(blob))
    enc = read_shard_encoding(reader.schema, "bench")
    first = 0
    for b in range(reader.num_record_batches):
        batch = reader.get_batch(b)
        yield decode_batch(batch, enc, "bench", 0, first)
        first += batch.num_rows


def stream_all(blob: bytes) -> int:
    """Decode every row, dropping each batch after use (the timed decode path)."""
    return sum(len(rows) for rows in stream_batches(blob))


def kl_topk(lp_exact: np.ndarray, lp_dec: np.ndarray, tail_dec: np.ndarray) -> float:
    """Mean KL(exact top-k + tail || decoded top-k + tail) in nats, same id order on both sides."""
    p = np.exp(lp_exact.astype(np.float64))
    t = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    kl = (p * (lp_exact.astype(np.float64) - lp_dec.astype(np.float64))).sum(axis=1)
    td = tail_dec.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl += np.where(t > 0, t * (np.log(np.maximum(t, 1e-300)) - np.log(np.maximum(td, 1e-300))), 0.0)
    return float(kl.mean())


def row_result(label: str, data: dict[str, Any], encoding: str, k: int | str, n: int, nbytes: int, kl: float | None,
               t_enc: tuple[float, float], t_dec: tuple[float, float], entries: float) -> dict[str, Any]:
    return {"input": label, "encoding": encoding, "k": k, "vocab_size": data["vocab"],
            "bytes_per_token": nbytes / n, "bytes_per_entry": nbytes / (n * entries),
            "kl_nats": kl, "encode_tokens_per_s": n / t_enc[0], "decode_tokens_per_s": n / t_dec[0],
            "encode_tokens_per_s_wall": n / t_enc[1], "decode_tokens_per_s_wall": n / t_dec[1]}


# ---------------------------------------------------------------- codecs under test


def bench_kdpipe_topk(data: dict[str, Any], k: int, repeats: int, id_coding: str = "set") -> dict[str, Any]:
    sids, inputs, positions = row_lists(data)
    ident = identity(TopKEncoding(k=k), data["vocab"])
    lps = np.ascontiguousarray(data["logprobs"][:, :k])
    batch = TopKBatch(sample_ids=sids, input_ids=inputs, positions=positions,
                      ids=np.ascontiguousarray(data["ids"][:, :k]), logprobs=lps)
    block = check_batch(batch, ident)
    enc = shard_encoding(ident, id_coding)

    def encode() -> bytes:
        return serialize_table(build_table(block, ident, enc), DEFAULT_COMPRESSION_LEVEL)

    blob = encode()
    t_enc = timed(encode, repeats)
    t_dec = timed(lambda: stream_all(blob), repeats)
    rows = read_all(blob)
    ids_dec = np.concatenate([r.ids for r in rows])
    # "set" lists entries of equal quantized value by rank, not in the teacher's order: compare as sets.
    if not np.array_equal(np.sort(ids_dec, axis=1), np.sort(batch.ids, axis=1)):
        raise SystemExit(f"kdpipe topk {id_coding}: decoded ids differ from the input (codec bug)")
    # Position-wise KL stays exact: reordered entries share one quantized value, hence one decoded log-prob.
    kl = kl_topk(lps, np.concatenate([r.logprobs for r in rows]), np.concatenate([r.tail for r in rows]))
    n = len(lps)
    name = "kdpipe topk" if id_coding == "set" else f"kdpipe topk {id_coding} (1.0)"
    return row_result(data["label"], data, name, k, n, len(blob), kl, t_enc, t_dec, k)


def bench_kdpipe_sampled(data: dict[str, Any], num_draws: int, repeats: int) -> dict[str, Any]:
    sids, inputs, positions = row_lists(data)
    ident = identity(SampledEncoding(num_draws=num_draws), data["vocab"])
    draws = np.ascontiguousarray(data["draws"][:, :num_draws])
    block = check_batch(SampledBatch(sample_ids=sids, input_ids=inputs, positions=positions, draws=draws), ident)

    def encode() -> bytes:
        return serialize_table(build_table(block, ident), DEFAULT_COMPRESSION_LEVEL)

    blob = encode()
    t_enc = timed(encode, repeats)
    t_dec = timed(lambda: stream_all(blob), repeats)
    rows = read_all(blob)
    uniques = float(np.mean([(r.counts > 0).sum(axis=1).mean() for r in rows]))
    n = len(draws)
    res = row_result(data["label"], data, f"kdpipe sampled N={num_draws}", f"~{uniques:.1f} unique", n, len(blob),
                     None, t_enc, t_dec, uniques)
    return res


def _baseline_table(sids: list[str], inputs: list[np.ndarray], positions: list[np.ndarray], ids: np.ndarray,
                    values: pa.Array, k: int) -> pa.Table:
    n_rows = len(sids)
    per = len(positions[0]) * k
    offsets = pa.array(np.arange(n_rows + 1, dtype=np.int32) * per)
    return pa.table({
        "sample_id": pa.array(sids),
        "input_ids": pa.array(inputs, pa.list_(pa.int32())),
        "positions": pa.array(positions, pa.list_(pa.int32())),
        "ids": pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), pa.int32())),
        "logprobs": pa.ListArray.from_arrays(offsets, values),
    })


def bench_baseline(data: dict[str, Any], k: int, kind: str, repeats: int) -> dict[str, Any]:
    sids, inputs, positions = row_lists(data)
    ids = np.ascontiguousarray(data["ids"][:, :k])
    lps = np.ascontiguousarray(data["logprobs"][:, :k])
    compression = None if kind == "int32+float32 raw" else pa.Codec("zstd", compression_level=DEFAULT_COMPRESSION_LEVEL)

    def encode() -> bytes:
        if kind == "int32+bf16 zstd":
            bits = (lps.view(np.uint32) + 0x7FFF + ((lps.view(np.uint32) >> 16) & 1)) >> 16  # round to nearest even
            values = pa.array(bits.astype(np.uint16).reshape(-1), pa.uint16())
        else:
            values = pa.array(lps.reshape(-1), pa.float32())
        table = _baseline_table(sids, inputs, positions, ids, values, k)
        sink = pa.BufferOutputStream()
        opts = pa.ipc.IpcWriteOptions(compression=compression, use_threads=False)
        with pa.ipc.new_file(sink, table.schema, options=opts) as w:
            w.write_table(table, max_chunksize=256)
        return sink.getvalue().to_pybytes()

    def decode() -> tuple[np.ndarray, np.ndarray]:
        t = pa.ipc.open_file(pa.BufferReader(blob)).read_all()
        got_ids = t.column("ids").combine_chunks().values.to_numpy().reshape(-1, k)
        raw = t.column("logprobs").combine_chunks().values.to_numpy()
        if kind == "int32+bf16 zstd":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return got_ids, raw.reshape(-1, k)

    blob = encode()
    t_enc = timed(encode, repeats)
    t_dec = timed(decode, repeats)
    _, dec = decode()
    p = np.exp(dec.astype(np.float64))
    tail = np.clip(1 - p.sum(axis=1), 0, 1)  # baselines store no tail: it is recomputed from the values
    kl = kl_topk(lps, dec, tail)
    return row_result(data["label"], data, kind, k, len(lps), len(blob), kl, t_enc, t_dec, k)


def column_breakdown(data: dict[str, Any], k: int, id_coding: str = "set") -> list[dict[str, Any]]:
    """Compressed bytes per token of each kdpipe topk column (each serialized alone, zstd level 3)."""
    sids, inputs, positions = row_lists(data)
    ident = identity(TopKEncoding(k=k), data["vocab"])
    batch = TopKBatch(sample_ids=sids, input_ids=inputs, positions=positions,
                      ids=np.ascontiguousarray(data["ids"][:, :k]),
                      logprobs=np.ascontiguousarray(data["logprobs"][:, :k]))
    table = build_table(check_batch(batch, ident), ident, shard_encoding(ident, id_coding))
    n = len(batch.logprobs)
    out = []
    for name in table.column_names:
        one = table.select([name]).replace_schema_metadata(None)
        out.append({"input": data["label"], "k": k, "column": name,
                    "bytes_per_token": len(serialize_table(one, DEFAULT_COMPRESSION_LEVEL)) / n})
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rows and repeats (about a minute)")
    ap.add_argument("--rows", type=int, default=None, help="rows of 256 tokens per input (default 128; quick 24)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5; quick 3)")
    ap.add_argument("--draws", type=int, nargs="+", default=[16, 32], help="sampled num_draws to measure")
    ap.add_argument("--no-real", action="store_true", help="skip the wikitext teacher (synthetic only)")
    ap.add_argument("--teacher", type=str, default=None,
                    help="a local HF causal LM folder: compare the topk id codings on it (k=64) instead")
    ap.add_argument("--arrays", type=str, default=None,
                    help="with --teacher: folder that keeps the teacher's top-64 arrays (loaded when present)")
    ap.add_argument("--json", type=str, default=None, help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    rows_n = args.rows or (24 if args.quick else 128)
    repeats = args.repeats or (3 if args.quick else 5)
    if args.teacher:
        from benchmarks import codec_teacher

        out = codec_teacher.run(args.teacher, rows_n, repeats, args.arrays)
    else:
        out = toy_and_synthetic(args, rows_n, repeats)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**out, "rows": rows_n, "repeats": repeats, "seq_len": SEQ_LEN, "load_average": os.getloadavg()[0],
                       "cpu_count": os.cpu_count(),
                       "timing": "tokens/s from process CPU time (one thread); *_wall from wall time"}, fh, indent=2)
    return 0


def toy_and_synthetic(args: argparse.Namespace, rows_n: int, repeats: int) -> dict[str, Any]:
    inputs = []
    if not args.no_real:
        t0 = time.perf_counter()
        inputs.append(real_inputs(rows_n, max(args.draws)))
        print(f"# real teacher pass: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    inputs.append(synthetic_inputs(rows_n, max(args.draws)))
    results: list[dict[str, Any]] = []
    breakdown: list[dict[str, Any]] = []
    for data in inputs:
        for k in (16, 64, 128):
            base = bench_baseline(data, k, "int32+float32 raw", repeats)
            group = [base, bench_baseline(data, k, "int32+float32 zstd", repeats),
                     bench_baseline(data, k, "int32+bf16 zstd", repeats), bench_kdpipe_topk(data, k, repeats)]
            if k == 64:
                group.append(bench_kdpipe_topk(data, k, repeats, id_coding="planes"))
            for r in group:
                r["size_vs_raw"] = r["bytes_per_token"] / base["bytes_per_token"]
                r["decode_vs_raw"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            results += group
        for nd in args.draws:
            r = bench_kdpipe_sampled(data, nd, repeats)
            raw64 = next(x for x in results if x["input"] == data["label"] and x["k"] == 64
                         and x["encoding"] == "int32+float32 raw")
            r["size_vs_raw"] = r["bytes_per_token"] / raw64["bytes_per_token"]
            results.append(r)
        breakdown += column_breakdown(data, 64)
    cols = ["input", "encoding", "k", "vocab_size", "bytes_per_token", "bytes_per_entry", "kl_nats",
            "encode_tokens_per_s", "decode_tokens_per_s", "size_vs_raw", "decode_vs_raw"]
    print(f"\n## codec (one thread; tokens/s from process CPU time, median of {repeats}; {rows_n} rows x "
          f"{SEQ_LEN - 1} positions per input; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    print_table(results, cols)
    print("\n## kdpipe topk k=64: compressed bytes per token of each column (serialized alone)\n")
    print_table(breakdown, ["input", "k", "column", "bytes_per_token"])
    return {"codec": results, "columns": breakdown}


if __name__ == "__main__":
    raise SystemExit(main())
