"""Dump throughput and where the time goes: teacher forward vs conversion vs encode+write.

Teacher: ``benchmarks.common.wikitext_teacher()`` (4 layers, width 256, BPE vocab up to 32k,
trained briefly on wikitext-2). Data: wikitext-2 ``test`` (LM windows). k = 64, float32, CPU.

For each backend the engine is loaded once (not timed), then, alternating, over the same rows:

- **baseline**: the teacher alone, ``backend.topk`` over every unit (what a dump can at best cost);
- **dump**: ``run_dump`` with that same engine (recipe excluded: it runs before the loop), i.e.
  teacher + conversion to arrays + batches handed to the writer, whose background thread
  encodes and writes while the next unit runs, + finalize.

Reported per backend: median wall of each over ``--repeats`` runs, tokens/s, the split of the
dump's wall time, and ``dump / baseline`` (target: everything outside the teacher <= 5% of the
dump's wall time, i.e. a ratio <= 1.053). Usage::

    .venv/bin/python -m benchmarks.dump --quick --json dump.json
    .venv/bin/python -m benchmarks.dump --backends hf --rows 256 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few rows and repeats (about a minute per backend)")
    p.add_argument("--backends", default="hf,vllm", help="comma-separated: hf,vllm")
    p.add_argument("--rows", type=int, default=None, help="LM windows to dump (default 128, quick 32)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per window")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="hf rows per forward pass")
    p.add_argument("--unit-rows", type=int, default=None, help="rows per unit (default rows/4)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5, quick 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--teacher", type=Path, default=None, help="another HF teacher folder (default: wikitext_teacher())")
    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    return p.parse_args(argv)


def _dump_config(teacher: Path, data: Path, out: Path, backend: str, args: argparse.Namespace, limit: int) -> Any:
    from pipeline.dump.run import DumpConfig

    return DumpConfig(teacher=str(teacher), dataset=str(data), out=str(out), backend=backend, task="lm",
                      top_k=args.top_k, max_length=args.max_length, batch_size=args.batch_size, device="cpu",
                      unit_rows=args.unit_rows, limit=limit, overwrite=True, progress=False,
                      max_logprobs=args.top_k)


def _lines_for_rows(data: Path, rows: int, max_length: int, tok: Any) -> int:
    """How many text lines give at least ``rows`` packed windows (so ``--limit`` picks the data)."""
    lines = data.read_text().splitlines()
    tokens = 0
    for i, ln in enumerate(lines, start=1):
        if ln.strip():
            tokens += len(tok(ln)["input_ids"]) + 1
        if tokens >= rows * max_length:
            return i
    return len(lines)


def _baseline(backend: Any, examples: list[Any], unit_rows: int, k: int) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(examples), unit_rows):
        rows = examples[s : s + unit_rows]
        backend.topk([e.input_ids for e in rows], [e.positions for e in rows], k)
    return time.perf_counter() - t0


def _bench_backend(name: str, teacher: Path, data: Path, args: argparse.Namespace, limit: int) -> dict[str, Any]:
    from pipeline.dump.run import (
        _setup_backend,
        _setup_examples,
        _setup_model_info,
        _setup_tokenizer,
        run_dump,
    )

    work = Path(tempfile.mkdtemp(prefix=f"kdpipe-bench-dump-{name}-"))
    try:
        cfg = _dump_config(teacher, data, work / "cache", name, args, limit)
        tok = _setup_tokenizer(cfg)
        info = _setup_model_info(cfg)
        _, recipe, _ = _setup_examples(cfg, tok, info, cfg.max_length)
        examples = recipe.examples
        tokens = sum(len(e.input_ids) for e in examples)
        t0 = time.perf_counter()
        backend = _setup_backend(cfg, tok, cfg.max_length)
        load_s = time.perf_counter() - t0
        _baseline(backend, examples[: cfg.unit_rows], cfg.unit_rows, cfg.top_k)  # warm-up
        run_dump(cfg, backend=backend)  # warm-up
        base_times: list[float] = []
        dumps: list[dict[str, Any]] = []
        for _ in range(args.repeats):
            base_times.append(_baseline(backend, examples, cfg.unit_rows, cfg.top_k))
            dumps.append(run_dump(cfg, backend=backend))
        backend.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = sorted(dumps, key=lambda d: d["wall_s"])[len(dumps) // 2]
    base = statistics.median(base_times)
    wall = med["wall_s"]
    return {
        "backend": name,
        "rows": med["rows"],
        "tokens": tokens,
        "load_s": load_s,
        "baseline_s": base,
        "baseline_tok_s": tokens / base,
        "dump_s": wall,
        "dump_tok_s": tokens / wall,
        # Median of per-pair ratios: each dump is timed right after its baseline, so slow drifts in
        # machine load (shared CI or dev boxes) cancel better than in a ratio of medians.
        "dump/baseline": statistics.median(d["wall_s"] / b for d, b in zip(dumps, base_times, strict=True)),
        "teacher_%": 100 * med["teacher_s"] / wall,
        "convert_%": 100 * med["convert_s"] / wall,
        "handoff_%": 100 * med["handoff_s"] / wall,
        "blocked_%": 100 * med["writer_blocked_s"] / wall,
        "final_flush_%": 100 * med["finalize_s"] / wall,
        "other_%": 100 * (wall - med["teacher_s"] - med["convert_s"] - med["handoff_s"] - med["finalize_s"]) / wall,
        "outside_teacher_%": 100 * med["outside_teacher_share"],
        "encode+write_bg_s": med["encode_s"] + med["write_s"],
        "bytes_per_token": med["bytes_per_token"],
        "all_dump_s": [d["wall_s"] for d in dumps],
        "all_baseline_s": base_times,
    }


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    args.rows = args.rows or (32 if args.quick else 128)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.unit_rows = args.unit_rows or max(1, args.rows // 4)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from benchmarks.common import SHARED_DATA, print_table, wikitext_teacher

    teacher = args.teacher or wikitext_teacher()
    data = SHARED_DATA / "wikitext-2" / "test.txt"
    limit = _lines_for_rows(data, args.rows, args.max_length, AutoTokenizer.from_pretrained(str(teacher)))
    results = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        print(f"benchmarking {name} ...", file=sys.stderr)
        results.append(_bench_backend(name, teacher, data, args, limit))
    print(f"\ndump-teacher, lm, k={args.top_k}, {args.max_length}-token windows, float32 on CPU "
          f"({os.cpu_count()} cores), median of {args.repeats}; teacher {teacher.name}\n")
    print_table(results, ["backend", "rows", "tokens", "baseline_tok_s", "dump_tok_s", "dump/baseline", "teacher_%",
                          "convert_%", "handoff_%", "blocked_%", "final_flush_%", "other_%", "outside_teacher_%",
                          "encode+write_bg_s",
                          "bytes_per_token"])
    print("\nbaseline = the teacher's top-k alone over the same rows; dump = run_dump with the same engine. "
          "handoff = writer.write/end_unit in the caller (checks + queueing, blocked included); final_flush = "
          "finalize waiting for the last unit's encode+write; encode+write_bg_s runs on the writer thread, "
          "overlapped with the teacher. Target: outside_teacher_% <= 5.")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
