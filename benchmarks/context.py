"""What context the teacher gets per LM target: NLL by position in the window, with and without overlap.

Teacher: a real pretrained model (default SmolLM2-135M, ``/work/models/smollm2``; build it with
``python ../shared/models/smollm2.py /work/models/smollm2``). Data: the first lines of
wikitext-2 ``test`` that give ``--windows`` non-overlapping windows of ``--max-length`` tokens.

Every configuration (``--bos`` policy x ``--stride``) builds its rows with the dump's own recipe
(``pipeline.dump.tasks``), runs the teacher once over them (float32, CPU, batches of ``--batch-size``
rows) and records, per target, the teacher's NLL of the actual next token, its position in the
row and its index in the token stream. Every configuration targets the same stream tokens, so
means over them are comparable. The top-64 of the same forward pass is written as a real cache
(``cache_format.CacheWriter``) for the bytes.

Printed per configuration:

- ``rows``, ``fwd/target``: row tokens the teacher runs per target (compute; the baseline is ~1),
  and measured ``ms/target`` (median over batches of ms per row token, times fwd/target);
- NLL by the target's position in its row (buckets ``0-7 .. 128-255``; with a stride only the
  first window has targets in the early buckets);
- ``NLL all``: mean over the stream tokens every configuration targets, ``ppl``, and ``NLL base
  0-7``: mean over the tokens the baseline predicts from positions 0-7 of its windows (the
  window starts that overlap is meant to fix);
- ``B/position``: cache bytes per target position (top-k k=64 + the stored input ids), and the
  ratios of fwd/target, ms/target, B/position and NLL all to the baseline (first row).

Usage (about 15 min on one core)::

    nice .venv/bin/python -m benchmarks.context --json docs/results/context.json
    nice .venv/bin/python -m benchmarks.context --windows 8 --strides 255,128   # quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import SHARED_DATA, print_table

BUCKETS = ((0, 8), (8, 32), (32, 128), (128, 256))
DEFAULT_TEACHER = Path("/work/models/smollm2")
# ../shared beside the checkout; /work/shared when the checkout is a worktree elsewhere.
DEFAULT_DATA = next((d / "wikitext-2" / "test.txt" for d in (SHARED_DATA, Path("/work/shared/data"))
                     if (d / "wikitext-2" / "test.txt").is_file()), SHARED_DATA / "wikitext-2" / "test.txt")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER, help="HF teacher folder")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--windows", type=int, default=40, help="non-overlapping windows of corpus (default 40)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--strides", default="255,224,192,128", help="--stride values with --bos never (first: baseline)")
    p.add_argument("--bos-always", default="254", help="--stride values with --bos always ('' for none)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def _lines_for_tokens(data: Path, tokens: int, tok: Any) -> int:
    """Dataset rows (lines) whose documents hold at least ``tokens`` stream tokens."""
    total = 0
    for i, line in enumerate(data.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            total += len(tok(line, add_special_tokens=False)["input_ids"]) + 1
        if total >= tokens:
            return i
    return i


def _doc_starts(ds: Any, tok: Any) -> dict[int, int]:
    """Stream index of each document's first token, keyed by dataset row (the recipe's tokenization)."""
    starts, pos = {}, 0
    for row, text in enumerate(ds.columns["text"]):
        if text.strip():
            starts[row] = pos
            pos += len(tok(text, add_special_tokens=False)["input_ids"]) + 1
    return starts


def _forward(model: Any, rows: list[Any], batch_size: int, k: int) -> tuple[list[np.ndarray], Any, Any, list[float]]:
    """Per row: NLL of each target; plus the top-k (ids, logprobs) of all targets and ms per row token per batch."""
    import torch

    nll: list[np.ndarray] = []
    ids_all, lps_all, ms_per_tok = [], [], []
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].input_ids))
    results: dict[int, tuple[np.ndarray, Any, Any]] = {}
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            for length in sorted({len(rows[i].input_ids) for i in chunk}, reverse=True):
                part = [i for i in chunk if len(rows[i].input_ids) == length]
                t0 = time.perf_counter()
                x = torch.as_tensor(np.stack([rows[i].input_ids for i in part]), dtype=torch.long)
                hidden = model.model(input_ids=x).last_hidden_state
                for j, i in enumerate(part):
                    pos = torch.as_tensor(rows[i].positions, dtype=torch.long)
                    lp = torch.log_softmax(model.lm_head(hidden[j, pos]).float(), dim=-1)
                    nxt = torch.as_tensor(rows[i].input_ids[rows[i].positions + 1], dtype=torch.long)
                    top = lp.topk(k, dim=-1)
                    results[i] = (-lp.gather(1, nxt[:, None])[:, 0].numpy(), top.indices.numpy(), top.values.numpy())
                ms_per_tok.append(1000 * (time.perf_counter() - t0) / x.numel())
    for i in range(len(rows)):
        nll.append(results[i][0])
        ids_all.append(results[i][1])
        lps_all.append(results[i][2])
    return nll, np.concatenate(ids_all), np.concatenate(lps_all), ms_per_tok


def _cache_bytes(cfg: Any, tok: Any, info: Any, ds: Any, rcfg: Any, rows: list[Any], ids: Any, lps: Any) -> int:
    from cache_format import CacheWriter, TopKBatch
    from pipeline.dump.run import _setup_identity

    identity = _setup_identity(cfg, tok, info, ds, rcfg, cfg.max_length)
    with CacheWriter(cfg.out, identity, mode="create") as writer:
        writer.write(TopKBatch(sample_ids=[r.sample_id for r in rows], input_ids=[r.input_ids for r in rows],
                               positions=[r.positions for r in rows], ids=ids, logprobs=lps))
        writer.end_unit(0)
        manifest = writer.finalize()
    return int(manifest["totals"]["bytes"])


def _measure(model: Any, teacher: Path, data: Path, limit: int, bos: str, stride: int, args: argparse.Namespace,
             work: Path) -> dict[str, Any]:
    from pipeline.dump.lm import parse_lm_sample_id
    from pipeline.dump.run import DumpConfig, _setup_model_info, _setup_tokenizer, whole_dataset_examples

    cfg = DumpConfig(teacher=str(teacher), dataset=str(data), out=str(work / f"{bos}-{stride}"), task="lm",
                     max_length=args.max_length, stride=stride, bos=bos, limit=limit, top_k=args.top_k,
                     unit_rows=1 << 20, device="cpu", progress=False)
    tok, info = _setup_tokenizer(cfg), _setup_model_info(cfg)
    ds, recipe, rcfg = whole_dataset_examples(cfg, tok, info, cfg.max_length)
    rows = recipe.examples
    nll, ids, lps, ms_per_tok = _forward(model, rows, args.batch_size, args.top_k)
    starts = _doc_starts(ds, tok)
    stream, pos, row = [], [], []
    for n, r in enumerate(rows):
        src = parse_lm_sample_id(str(r.sample_id))
        stream.append(starts[src.doc] + src.tok + np.arange(len(r.positions)))
        pos.append(r.positions)
        row.append(np.full(len(r.positions), n))
    return {"bos": bos, "stride": stride, "rows": len(rows), "fwd_tokens": sum(len(r.input_ids) for r in rows),
            "ms_per_row_token": statistics.median(ms_per_tok), "stream": np.concatenate(stream),
            "pos": np.concatenate(pos), "row": np.concatenate(row), "nll": np.concatenate(nll),
            "bytes": _cache_bytes(cfg, tok, info, ds, rcfg, rows, ids, lps)}


def _mean_over(r: dict[str, Any], tokens: np.ndarray) -> float:
    """Mean NLL of ``r`` over the stream tokens ``tokens``."""
    return float(r["nll"][np.isin(r["stream"], tokens)].mean())


def _summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = results[0]
    common = base["stream"]
    for r in results[1:]:
        common = np.intersect1d(common, r["stream"])
    # The baseline's window starts, first window excluded (every configuration starts the same way).
    early = base["stream"][(base["pos"] < 8) & (base["row"] > 0)]
    table = []
    for r in results:
        targets = len(r["stream"])
        row: dict[str, Any] = {"config": f"bos {r['bos']}, stride {r['stride']}", "rows": r["rows"],
                               "fwd/target": r["fwd_tokens"] / targets,
                               "ms/target": r["ms_per_row_token"] * r["fwd_tokens"] / targets}
        for lo, hi in BUCKETS:
            sel = (r["pos"] >= lo) & (r["pos"] < hi)
            row[f"NLL {lo}-{hi - 1}"] = float(r["nll"][sel].mean()) if sel.any() else None
        row["NLL all"] = _mean_over(r, common)
        row["ppl"] = float(np.exp(row["NLL all"]))
        row["NLL base 0-7"] = _mean_over(r, early)
        row["B/position"] = r["bytes"] / targets
        table.append(row)
    b = table[0]
    for row in table:
        for key in ("fwd/target", "ms/target", "B/position", "NLL all"):
            row[f"{key} x"] = row[key] / b[key]
    return table


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    if not (args.teacher / "model.safetensors").is_file():
        raise SystemExit(f"{args.teacher} holds no model; build it with ../shared/models/smollm2.py {args.teacher}")
    tok = AutoTokenizer.from_pretrained(str(args.teacher))
    limit = _lines_for_tokens(args.data, args.windows * (args.max_length - 1) + 1, tok)
    model = AutoModelForCausalLM.from_pretrained(str(args.teacher), dtype=torch.float32).eval()
    with torch.inference_mode():  # warm-up: the first forward pays for allocations, not for the windows
        model(input_ids=torch.zeros((1, args.max_length), dtype=torch.long))
    configs = [("never", int(s)) for s in args.strides.split(",") if s]
    configs += [("always", int(s)) for s in args.bos_always.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="kdpipe-bench-context-"))
    try:
        results = [_measure(model, args.teacher, args.data, limit, bos, stride, args, work) for bos, stride in configs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = _summarise(results)
    cols = ["config", "rows", "fwd/target", "ms/target"] + [f"NLL {lo}-{hi - 1}" for lo, hi in BUCKETS]
    cols += ["NLL all", "ppl", "NLL base 0-7", "B/position", "fwd/target x", "ms/target x", "B/position x", "NLL all x"]
    print(f"teacher {args.teacher}, {limit} lines of {args.data.name}, max_length {args.max_length}, "
          f"{len(results[0]['stream'])} targets, k={args.top_k}, {args.threads} thread(s)")
    print_table(table, cols)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "lines": limit,
                                         "table": table}, indent=2))


if __name__ == "__main__":
    main()
