"""Dump throughput of each teacher path, side by side with a bare vLLM forward, and where the time goes.

Teacher: ``--teacher`` (default ``benchmarks.common.wikitext_teacher()``; the issue's numbers use
the real SmolLM2-135M built by ``python ../shared/models/smollm2.py DIR``). Data: ``--data``
(default wikitext-2 ``test`` from ``../shared/data``), packed into ``--max-length``-token windows.

Paths (``--paths``), each over the same windows in units of ``--unit-rows`` rows:

- ``vllm-bare``: ``LLM.generate(max_tokens=1)`` with no log-probs, per unit: the teacher's forward
  alone (one head row per window), what any capture path can at best cost;
- ``vllm-pooling``: the pooling runner's ``encode`` alone (the hidden path's forward, every
  position's last hidden state back to the caller), per unit;
- ``vllm-logprobs-topk``: ``run_dump`` top-k through prompt log-probs (``--vllm-capture logprobs``);
- ``vllm-hidden-topk`` / ``vllm-hidden-sampled``: ``run_dump`` through hidden-state capture
  (``--vllm-capture hidden``): pooling runner + the teacher's head in chunks + top-k / draws;
- ``vllm-hidden-both``: ``run_dump --out-sampled``: top-k and sampled caches from one pass;
- ``hf-topk`` / ``hf-sampled``: ``run_dump --backend hf``.

Engines are loaded once (not timed) and warmed up on one unit; then the paths run interleaved
``--repeats`` times (slow drifts in machine load hit every path alike). Reported per path: the
median of this process's CPU time (all its threads: engine, head, writer; steady on a shared
machine, so ratios use it first) and of wall time, tokens/s, ratios against ``vllm-bare`` and
``vllm-logprobs-topk`` (medians of per-repeat ratios), the dump's split (teacher / conversion /
outside the teacher), and the issue's targets: sampled >= 0.8x top-k logprobs; both >= 0.95x bare; both-in-one-pass <= 1.1x
top-k alone. ``--full-logprobs-rows N`` also times ``prompt_logprobs=-1`` (the full vocabulary
as Python lists) once on N windows, the baseline hidden capture replaces. Usage::

    .venv/bin/python -m benchmarks.dump --teacher /work/models/smollm2 --rows 24 --repeats 3
    .venv/bin/python -m benchmarks.dump --quick --paths hf-topk,vllm-logprobs-topk
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple


class Run(NamedTuple):
    wall_s: float
    cpu_s: float  # this process's CPU time (all its threads): steadier than wall time on a shared machine
    summary: Any  # run_dump's summary, None for the bare forwards


ALL_PATHS = ("vllm-bare", "vllm-pooling", "vllm-logprobs-topk", "vllm-hidden-topk", "vllm-hidden-sampled",
             "vllm-hidden-both", "hf-topk", "hf-sampled")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few rows and repeats")
    p.add_argument("--paths", default=",".join(ALL_PATHS), help="comma-separated, from: " + ",".join(ALL_PATHS))
    p.add_argument("--rows", type=int, default=None, help="windows to dump (default 24, quick 8)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per window")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--num-draws", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (hf) / per head batch (hidden)")
    p.add_argument("--unit-rows", type=int, default=None, help="rows per unit (default rows/2)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per path (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: what vLLM leaves)")
    p.add_argument("--teacher", type=Path, default=None, help="HF teacher folder (default: wikitext_teacher())")
    p.add_argument("--data", type=Path, default=None, help="wikitext-style text file (default: wikitext-2 test)")
    p.add_argument("--full-logprobs-rows", type=int, default=0, help="also time prompt_logprobs=-1 on N windows")
    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    return p.parse_args(argv)


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


class _Bench:
    """Engines, windows and one closure per path; each closure returns (wall_s, dump summary or None)."""

    def __init__(self, args: argparse.Namespace, teacher: Path, data: Path, work: Path) -> None:
        from pipeline.dump.run import DumpConfig, _setup_model_info, _setup_tokenizer, whole_dataset_examples

        self.args, self.work = args, work
        tok = _setup_tokenizer(DumpConfig(teacher=str(teacher), dataset=str(data), out=str(work / "x")))
        limit = _lines_for_rows(data, args.rows, args.max_length, tok)
        # A text file's units are byte ranges: split the used bytes as --unit-rows splits the windows (about).
        used = sum(len(ln) for ln in data.read_bytes().split(b"\n", limit)[:limit]) + limit
        n_units = max(1, -(-args.rows // args.unit_rows))
        self.base = {"teacher": str(teacher), "dataset": str(data), "task": "lm", "top_k": args.top_k,
                     "num_draws": args.num_draws, "max_length": args.max_length, "batch_size": args.batch_size,
                     "unit_rows": args.unit_rows, "unit_bytes": -(-used // n_units), "limit": limit, "overwrite": True, "progress": False,
                     "max_logprobs": args.top_k, "device": "auto"}
        cfg = DumpConfig(**self.base, out=str(work / "x"))
        _, recipe, _ = whole_dataset_examples(cfg, tok, _setup_model_info(cfg), args.max_length)
        self.examples = recipe.examples  # the windows every dump of ``limit`` lines makes
        self.tokens = sum(len(e.input_ids) for e in self.examples)
        self.tok = tok
        self.backends: dict[str, Any] = {}

    def backend(self, key: str) -> Any:
        """One engine per kind ("hf", "logprobs", "hidden"), loaded on first use."""
        if key not in self.backends:
            from pipeline.dump.run import DumpConfig, _setup_backend

            kw = {"backend": "hf"} if key == "hf" else {"backend": "vllm", "vllm_capture": key}
            cfg = DumpConfig(**self.base, **kw, out=str(self.work / "x"))
            t0 = time.perf_counter()
            self.backends[key] = _setup_backend(cfg, self.tok, self.args.max_length)
            print(f"loaded {key} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return self.backends[key]

    def warm_up(self) -> None:
        """One unit through every loaded engine and code path (first calls pay one-off costs)."""
        from pipeline.dump.teachers.base import Want

        rows = self.units()[0]
        seqs, positions = [e.input_ids for e in rows], [e.positions for e in rows]
        for key, backend in self.backends.items():
            print(f"warm-up {key} ...", file=sys.stderr)
            if key == "logprobs":
                backend.topk(seqs, positions, self.args.top_k)
                self.bare("logprobs")()
            else:
                backend.capture(seqs, positions, Want(top_k=self.args.top_k, num_draws=self.args.num_draws))
            if key == "hidden":
                backend._encode(seqs, "token_embed")

    def units(self) -> list[list[Any]]:
        n = self.args.unit_rows
        return [self.examples[s : s + n] for s in range(0, len(self.examples), n)]

    def dump(self, backend_key: str, **kw: Any) -> Callable[[], Run]:
        from pipeline.dump.run import DumpConfig, run_dump

        engine = {"backend": "hf"} if backend_key == "hf" else {"backend": "vllm", "vllm_capture": backend_key}
        if "out_sampled" in kw:
            kw["out_sampled"] = str(self.work / kw["out_sampled"])
        cfg = DumpConfig(**self.base, **engine, **kw, out=str(self.work / "cache"))
        backend = self.backend(backend_key)

        def run() -> Run:
            c0 = time.process_time()
            summary = run_dump(cfg, backend=backend)
            return Run(summary["wall_s"], time.process_time() - c0, summary)

        return run

    def bare(self, key: str) -> Callable[[], Run]:
        backend = self.backend(key)

        def run() -> Run:
            t0, c0 = time.perf_counter(), time.process_time()
            for rows in self.units():
                seqs = [e.input_ids for e in rows]
                if key == "hidden":
                    backend._encode(seqs, "token_embed")
                else:
                    params = backend._vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
                    backend.llm.generate([{"prompt_token_ids": s.tolist()} for s in seqs], params, use_tqdm=False)
            return Run(time.perf_counter() - t0, time.process_time() - c0, None)

        return run

    def path(self, name: str) -> Callable[[], Run]:
        table: dict[str, Callable[[], Callable[[], Run]]] = {
            "vllm-bare": lambda: self.bare("logprobs"),
            "vllm-pooling": lambda: self.bare("hidden"),
            "vllm-logprobs-topk": lambda: self.dump("logprobs"),
            "vllm-hidden-topk": lambda: self.dump("hidden"),
            "vllm-hidden-sampled": lambda: self.dump("hidden", encoding="sampled"),
            "vllm-hidden-both": lambda: self.dump("hidden", out_sampled="cache_sampled"),
            "hf-topk": lambda: self.dump("hf"),
            "hf-sampled": lambda: self.dump("hf", encoding="sampled"),
        }
        if name not in table:
            raise SystemExit(f"unknown path {name!r}; choose from {', '.join(ALL_PATHS)}")
        return table[name]()


def _full_logprobs(bench: _Bench, rows: int) -> dict[str, Any]:
    """``prompt_logprobs=-1`` once on ``rows`` windows, converted to one float32 array per window."""
    import numpy as np

    from pipeline.dump.teachers import TeacherSettings, make_backend

    engine = make_backend(TeacherSettings(model=bench.base["teacher"], backend="vllm", max_length=bench.args.max_length,
                                          max_logprobs=-1, vllm_capture="logprobs"))
    seqs = [e.input_ids for e in bench.examples[:rows]]
    params = engine._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1, flat_logprobs=True,
                                         detokenize=False)
    t0 = time.perf_counter()
    outs = engine.llm.generate([{"prompt_token_ids": s.tolist()} for s in seqs], params, use_tqdm=False)
    t1 = time.perf_counter()
    arrays = [np.asarray(o.prompt_logprobs.logprobs, dtype=np.float32) for o in outs]
    t2 = time.perf_counter()
    engine.close()
    tokens = sum(len(s) for s in seqs)
    return {"path": "vllm-full-logprobs", "tokens": tokens, "median_s": t2 - t0, "tok_s": tokens / (t2 - t0),
            "convert_%": 100 * (t2 - t1) / (t2 - t0), "floats": int(sum(a.size for a in arrays))}


def _ratio(runs: dict[str, list[Run]], a: str, b: str, field: str = "cpu_s") -> float | None:
    """Speed of ``a`` relative to ``b``: the median over repeats of time(b) / time(a) (runs are interleaved)."""
    if a not in runs or b not in runs:
        return None
    return statistics.median(getattr(rb, field) / getattr(ra, field) for ra, rb in zip(runs[a], runs[b], strict=True))


def _row(name: str, tokens: int, runs: dict[str, list[Run]]) -> dict[str, Any]:
    mine = runs[name]
    wall = statistics.median(r.wall_s for r in mine)
    cpu = statistics.median(r.cpu_s for r in mine)
    row: dict[str, Any] = {"path": name, "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "tok_per_cpu_s": tokens / cpu,
                           "tok_per_wall_s": tokens / wall,
                           "x_bare_cpu": _ratio(runs, name, "vllm-bare"), "x_bare_wall": _ratio(runs, name, "vllm-bare",
                                                                                             "wall_s"),
                           "x_logprobs_cpu": _ratio(runs, name, "vllm-logprobs-topk"),
                           "all_wall_s": [r.wall_s for r in mine], "all_cpu_s": [r.cpu_s for r in mine]}
    summaries = [r.summary for r in mine if r.summary is not None]
    if summaries:
        med = sorted(summaries, key=lambda s: s["wall_s"])[len(summaries) // 2]
        w = med["wall_s"]
        row.update({"teacher_%": 100 * med["teacher_s"] / w, "convert_%": 100 * med["convert_s"] / w,
                    "outside_teacher_%": 100 * med["outside_teacher_share"], "B/position": med["bytes_per_token"]})
    return row


_CHECKS = [
    ("sampled / top-k logprobs (speed)", "vllm-hidden-sampled", "vllm-logprobs-topk", 0.8),
    ("sampled / bare forward (speed)", "vllm-hidden-sampled", "vllm-bare", 0.95),
    ("top-k logprobs / bare forward (speed)", "vllm-logprobs-topk", "vllm-bare", 0.95),
    ("top-k hidden / bare forward (speed)", "vllm-hidden-topk", "vllm-bare", 0.95),
    ("top-k hidden / top-k logprobs (speed)", "vllm-hidden-topk", "vllm-logprobs-topk", None),
    ("pooling forward / bare forward (speed)", "vllm-pooling", "vllm-bare", None),
]


def _targets(runs: dict[str, list[Run]]) -> list[dict[str, Any]]:
    """The issue's targets, on CPU time (primary: steady on a shared machine) and on wall time."""
    out = []
    for what, a, b, target in _CHECKS:
        cpu, wall = _ratio(runs, a, b), _ratio(runs, a, b, "wall_s")
        if cpu is not None and wall is not None:
            out.append({"check": what, "cpu": cpu, "wall": wall, "target": f">= {target}" if target else "-",
                        "met (cpu)": None if target is None else cpu >= target})
    for topk in ("vllm-logprobs-topk", "vllm-hidden-topk"):
        cpu, wall = _ratio(runs, "vllm-hidden-both", topk), _ratio(runs, "vllm-hidden-both", topk, "wall_s")
        if cpu is not None and wall is not None:
            out.append({"check": f"time of both in one pass / time of {topk}", "cpu": 1 / cpu, "wall": 1 / wall,
                        "target": "<= 1.1", "met (cpu)": 1 / cpu <= 1.1})
    return out


def _report(args: argparse.Namespace, bench: _Bench, teacher: Path, rows: list[dict[str, Any]],
            targets: list[dict[str, Any]], full: dict[str, Any] | None) -> None:
    import torch

    from benchmarks.common import print_table

    print(f"\ndump-teacher, lm, {len(bench.examples)} windows of <= {args.max_length} tokens, k={args.top_k}, "
          f"{args.num_draws} draws, float32 on CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"threads), median of {args.repeats} interleaved repeats; teacher {teacher}\n")
    print_table(rows, ["path", "tokens", "cpu_s", "wall_s", "tok_per_cpu_s", "tok_per_wall_s", "x_bare_cpu",
                       "x_bare_wall", "x_logprobs_cpu", "teacher_%", "convert_%", "outside_teacher_%", "B/position"])
    if full:
        print(f"\nprompt_logprobs=-1 (the full vocabulary as Python lists), once on {full['tokens']} tokens: "
              f"{full['tok_s']:.1f} tok/s (wall), {full['convert_%']:.1f}% of it converting {full['floats']} floats")
    print()
    print_table(targets, ["check", "cpu", "wall", "target", "met (cpu)"])
    print("\ncpu = this process's CPU time (engine, head, writer threads), the primary figure on a shared machine; "
          "x_* = speed relative to vllm-bare / vllm-logprobs-topk (median of per-repeat ratios). teacher_% = the "
          "backend's forward + head + top-k/draws; convert_% = engine output -> arrays; outside_teacher_% = the rest "
          "of the dump's wall time (target <= 5).")


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    args.rows = args.rows or (8 if args.quick else 24)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.unit_rows = args.unit_rows or max(1, args.rows // 2)
    from benchmarks.common import SHARED_DATA, wikitext_teacher

    teacher = args.teacher or wikitext_teacher()
    data = args.data or SHARED_DATA / "wikitext-2" / "test.txt"
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    work = Path(tempfile.mkdtemp(prefix="kdpipe-bench-dump-"))
    try:
        bench = _Bench(args, teacher, data, work)
        fns = {name: bench.path(name) for name in paths}
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        bench.warm_up()
        runs: dict[str, list[Run]] = {name: [] for name in paths}
        for r in range(args.repeats):
            for name, fn in fns.items():
                runs[name].append(fn())
                print(f"repeat {r + 1}: {name} wall {runs[name][-1].wall_s:.2f} s, cpu {runs[name][-1].cpu_s:.2f} s",
                      file=sys.stderr)
        full = _full_logprobs(bench, args.full_logprobs_rows) if args.full_logprobs_rows else None
        for b in bench.backends.values():
            b.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [_row(n, bench.tokens, runs) for n in paths]
    targets = _targets(runs)
    _report(args, bench, teacher, rows, targets, full)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows,
                                         "targets": targets, "full_logprobs": full}, indent=2) + "\n")


if __name__ == "__main__":
    main()
