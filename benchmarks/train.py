"""Training-step cost of offline KD versus plain cross-entropy and online KD (CPU).

Student: a fresh Llama with 4 layers, width 256 and the vocabulary of
``benchmarks.common.wikitext_teacher()`` (BPE, ~20-32k). One batch of ``--batch-size`` rows
of ``--seq-len`` tokens of wikitext-2, the same for every configuration:

* (a) ``ce``: plain cross-entropy, the usual HF step (``model(input_ids, labels=...)``);
* (b) ``kd_offline``: kdpipe's step (``pipeline.train.distill.DistillModule`` with
  ``SparseKDLoss``, forward KL, chunked head) from a k=64 cache of the wikitext teacher;
* (c) ``kd_online``: the teacher-in-memory alternative: a teacher about twice the student's
  size (6 layers, width 384) runs forward in the same step and the loss is the full-vocabulary
  KL between the two ``[B, T, V]`` logit tensors;
* the loss alone on the same hidden states: chunked (kdpipe) vs full-vocabulary logits;
* (d) ``kd_stream`` / ``kd_stream_verified``: (b) with the batch read from the cache in every step
  (shard opened, decoded, collated), without and with the sha256 check of the shard that
  ``train-student`` and ``eval`` do by default (``--no-verify-checksums`` turns it off). The cache
  holds one batch, so every step hashes exactly the bytes it trains on, as an epoch of training does.

Every step is forward + backward + AdamW update (the loss-alone rows: forward + backward).
**Time**: median over all measured steps (one warm-up step excluded), as wall time and as
process CPU time; workers use 1 torch thread by default so CPU time does not depend on what
else runs on the machine. Configurations run interleaved, each round in a fresh process.
**Peak memory**: each configuration runs in its own fresh subprocess. After the warm-up step
(which allocates the AdamW state) the resident high-water mark is reset (Linux
``/proc/self/clear_refs``), and after the measured steps ``VmHWM`` is read: ``peak_MB`` is the
process's resident peak during the steps, ``step_peak_MB`` is that minus the resident size
before them (activations, logits, gradients: what the step itself needs).

    python -m benchmarks.train --quick            # ~3 min on 2 cores
    python -m benchmarks.train --only kd_stream,kd_stream_verified   # the checksum cost alone
    python -m benchmarks.train --json train.json  # 3 rounds

**With a real teacher** (``--teacher DIR``, e.g. SmolLM2-135M): the student is the teacher cut to
``--student-layers`` layers (same tokenizer and head), and three kdpipe steps are compared on the
same batch of wikitext-2 test windows: ``ce`` (HF cross-entropy), ``kd_offline`` (the trainer's step
from a k=64 cache written by ``dump-teacher``) and ``kd_online`` (the same step with the targets of
``OnlineTeacher``, what ``train-student --teacher`` runs: the teacher's forward and its full
distribution, chunked, inside the step). Peak memory includes the resident teacher.

    python -m benchmarks.train --teacher /work/models/smollm2 --student-layers 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CACHE_DIR, SHARED_DATA, print_table, wikitext_lines, wikitext_teacher

CONFIGS = ["ce", "kd_offline", "kd_online", "loss_full", "loss_chunked", "kd_stream", "kd_stream_verified"]
# What each configuration is compared with (the time_vs_base columns).
BASELINE = {"ce": "ce", "kd_offline": "ce", "kd_online": "ce", "loss_full": "loss_full",
            "loss_chunked": "loss_full", "kd_stream": "kd_stream", "kd_stream_verified": "kd_stream"}
STUDENT = {"hidden_size": 256, "num_layers": 4}
ONLINE_TEACHER = {"hidden_size": 384, "num_layers": 6}  # ~2x the student's parameters
K = 64


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the resident high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_cache(batch_size: int, seq_len: int) -> Path:
    """A k=64 cache of ``batch_size`` windows of wikitext-2 through the wikitext teacher (built once)."""
    out = CACHE_DIR / f"train-bench-k{K}-b{batch_size}-t{seq_len}"
    if (out / "manifest.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cache_format import CacheIdentity, CacheWriter, TopKBatch, TopKEncoding, tokenizer_fingerprint
    from pipeline.demo.toy import token_stream

    teacher_dir = wikitext_teacher()
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    stream = token_stream(tok, wikitext_lines("test"))
    rows = [stream[i * seq_len:(i + 1) * seq_len].astype(np.int32) for i in range(batch_size)]
    ident = CacheIdentity(
        teacher={"name": str(teacher_dir), "revision": "bench", "dtype": "float32", "backend": "hf",
                 "backend_version": "bench"},
        tokenizer={"name": str(teacher_dir), "vocab_size": len(tok), "model_vocab_size": teacher.config.vocab_size,
                   "fingerprint": tokenizer_fingerprint(tok)},
        recipe={"task": "lm", "template": None, "max_length": seq_len, "fields": {"text": "text"}},
        dataset={"name": "wikitext-2", "config": None, "split": "test", "fingerprint": "bench", "num_rows": batch_size},
        encoding=TopKEncoding(k=K),
    )
    with torch.no_grad():
        logp = torch.log_softmax(teacher(torch.as_tensor(np.stack(rows)).long()).logits.double(), -1)[:, :-1]
    vals, ids = logp.topk(K, -1)
    with CacheWriter(out, ident, mode="overwrite") as w:
        w.write(TopKBatch(sample_ids=[f"w{i}" for i in range(batch_size)], input_ids=rows,
                          positions=[np.arange(seq_len - 1, dtype=np.int32)] * batch_size,
                          ids=ids.reshape(-1, K).numpy().astype(np.int32),
                          logprobs=vals.reshape(-1, K).numpy().astype(np.float32)))
        w.end_unit(0)
        w.finalize()
    return out


def worker(config: str, cache: Path, steps: int, chunk_size: int, threads: int) -> dict[str, Any]:
    """Run one configuration in this (fresh) process; returns step times and memory."""
    import torch

    torch.set_num_threads(threads)
    from cache_format import open_cache
    from pipeline.demo.toy import build_llama
    from pipeline.train.collate import collate_rows
    from pipeline.train.distill import DistillModule, cached_targets
    from pipeline.train.kd_loss import SparseKDLoss
    from pipeline.train.losses import LossSpec, full_kd_loss

    reader = open_cache(str(cache))
    batch = collate_rows(list(reader.iter_rows()), "topk", pad_id=0)
    vocab = int(reader.manifest.identity.tokenizer["model_vocab_size"])
    student = build_llama(vocab, max_position_embeddings=1024, seed=0, **STUDENT).train()
    n_params = sum(p.numel() for p in student.parameters())
    info: dict[str, Any] = {"config": config, "student_params_M": n_params / 1e6}
    spec = LossSpec(kind="fkl")
    step_fn: Any
    if config.startswith("loss_"):
        mask = batch["target_mask"]
        with torch.no_grad():
            hidden = student.model(input_ids=batch["input_ids"]).last_hidden_state[mask].detach()
        targets = cached_targets(batch)
        weight = student.lm_head.weight
        h = hidden.requires_grad_(True)
        chunked = SparseKDLoss(spec, chunk_size)

        def step_fn() -> None:
            if config == "loss_full":
                loss = full_kd_loss(h, weight, None, targets, spec)
            else:
                loss = chunked(h, student.lm_head, targets, normalizer=1.0).loss  # a sum, like full_kd_loss
            loss.backward()
            h.grad = None
            weight.grad = None
    else:
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        if config == "ce":
            def loss_fn() -> torch.Tensor:
                labels = batch["input_ids"].clone()  # HF shifts labels inside
                return student(input_ids=batch["input_ids"], labels=labels).loss
        elif config == "kd_offline":
            module = DistillModule(student, SparseKDLoss(spec, chunk_size))

            def loss_fn() -> torch.Tensor:
                return module(batch, cached_targets(batch)).loss  # mean per target position
        elif config.startswith("kd_stream"):
            module = DistillModule(student, SparseKDLoss(spec, chunk_size))
            stream = open_cache(str(cache), verify_checksums=config == "kd_stream_verified")

            def loss_fn() -> torch.Tensor:
                stream.close()  # the shard is opened (and hashed, when verifying) again, as in a new epoch
                fresh = collate_rows(list(stream.iter_rows()), "topk", pad_id=0)
                return module(fresh, cached_targets(fresh)).loss
        else:
            teacher = build_llama(vocab, max_position_embeddings=1024, seed=1, **ONLINE_TEACHER).eval()
            info["teacher_params_M"] = sum(p.numel() for p in teacher.parameters()) / 1e6

            def loss_fn() -> torch.Tensor:
                with torch.no_grad():
                    t_logp = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits[:, :-1].float(), -1)
                s_logp = torch.log_softmax(student(input_ids=batch["input_ids"]).logits[:, :-1].float(), -1)
                return torch.nn.functional.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / t_logp.shape[:2].numel()

        def step_fn() -> None:
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return _measure(step_fn, steps, info)


def _measure(step_fn: Any, steps: int, info: dict[str, Any]) -> dict[str, Any]:
    """One warm-up call of ``step_fn``, then ``steps`` timed calls; times and memory added to ``info``."""
    step_fn()  # warm-up: allocates the AdamW state and the allocator's pools, like any first step
    before = _status_mb("VmRSS")
    info["peak_reset"] = _reset_peak()
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step_fn()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = _peak_mb()
    info.update(step_times=times, step_cpu_times=cpu_times, rss_before_MB=before, peak_MB=peak,
                step_peak_MB=peak - before)
    return info


def _run_worker(config: str, cache: Path, steps: int, chunk_size: int, threads: int,
                extra: tuple[str, ...] = ()) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    cmd = [sys.executable, "-m", "benchmarks.train", "--worker", config, "--cache", str(cache),
           "--steps", str(steps), "--chunk-size", str(chunk_size), "--threads", str(threads), "--json", path, *extra]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    out = json.loads(Path(path).read_text())
    os.unlink(path)
    return out


# -- a real teacher (--teacher DIR): offline vs online KD with kdpipe's own steps ---------------------

REAL_CONFIGS = ["real_ce", "real_kd_offline", "real_kd_online"]


def build_real_cache(teacher_dir: Path, dataset: Path, batch_size: int, seq_len: int) -> Path:
    """A k=64 cache of ``dataset`` windows through ``teacher_dir``, written by kdpipe's own dump (once)."""
    out = CACHE_DIR / f"train-bench-{teacher_dir.name}-k{K}-b{batch_size}-t{seq_len}"
    if (out / "manifest.json").is_file():
        return out
    from pipeline.dump.run import DumpConfig, run_dump

    # ~40 wikitext lines per window are more than enough text for batch_size packed windows of seq_len tokens
    run_dump(DumpConfig(teacher=str(teacher_dir), task="lm", dataset=str(dataset), limit=40 * batch_size,
                        max_length=seq_len, top_k=K, out=str(out), overwrite=True, progress=False))
    return out


def real_worker(config: str, cache: Path, teacher_dir: Path, student_layers: int, batch_size: int, steps: int,
                chunk_size: int, threads: int) -> dict[str, Any]:
    """One configuration with the real teacher, in this (fresh) process: the student is the teacher with
    ``student_layers`` of its layers (same tokenizer and head); the step is the trainer's
    (``DistillModule`` + ``SparseKDLoss``) from the cache's targets, or from ``OnlineTeacher`` (what
    ``train-student --teacher`` runs), or plain HF cross-entropy."""
    import gc
    import itertools

    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from cache_format import open_cache
    from pipeline.train.collate import collate_rows
    from pipeline.train.distill import DistillModule, OnlineTeacher, cached_targets
    from pipeline.train.kd_loss import SparseKDLoss
    from pipeline.train.losses import LossSpec
    from pipeline.train.student import head_spec, shrink_model

    batch = collate_rows(list(itertools.islice(open_cache(str(cache)).iter_rows(), batch_size)), "topk", pad_id=0)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    student = shrink_model(teacher, student_layers, AutoModelForCausalLM).train()
    module = DistillModule(student, SparseKDLoss(LossSpec(kind="fkl"), chunk_size, head_spec(student)))
    info: dict[str, Any] = {"config": config, "student_params_M": sum(p.numel() for p in student.parameters()) / 1e6,
                            "targets": int(batch["num_targets"])}
    online = None
    if config == "real_kd_online":
        online = OnlineTeacher(teacher, head_spec=head_spec(teacher))
        info["teacher_params_M"] = sum(p.numel() for p in teacher.parameters()) / 1e6
    else:
        del teacher  # offline and CE runs hold no teacher
        gc.collect()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def step_fn() -> None:
        if config == "real_ce":
            loss = student(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        else:
            loss = module(batch, cached_targets(batch) if online is None else online(batch)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _measure(step_fn, steps, info)


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median step time, CPU time and memory over every measured step / run of one configuration."""
    pooled = {key: [v for run in runs for v in (run[key] if isinstance(run[key], list) else [run[key]])]
              for key in ("step_times", "step_cpu_times", "peak_MB", "step_peak_MB")}
    return {name: statistics.median(pooled[key]) for name, key in
            (("step_s", "step_times"), ("step_cpu_s", "step_cpu_times"), ("peak_MB", "peak_MB"),
             ("step_peak_MB", "step_peak_MB"))}


def real_teacher_main(args: argparse.Namespace) -> None:
    """Offline (k=64 cache) vs online KD (``--teacher``) vs CE with a real teacher, side by side."""
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    teacher = args.teacher.resolve()
    cache = build_real_cache(teacher, args.dataset, args.batch_size, args.seq_len)
    extra = ("--teacher", str(teacher), "--student-layers", str(args.student_layers),
             "--batch-size", str(args.batch_size))
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in REAL_CONFIGS}
    for r in range(rounds):
        for c in REAL_CONFIGS:
            print(f"round {r + 1}/{rounds}: {c}", file=sys.stderr, flush=True)
            runs[c].append(_run_worker(c, cache, steps, args.chunk_size, args.threads, extra))
    by = {c: {"config": c.removeprefix("real_"), **_medians(runs[c]),
              "params_M": runs[c][0]["student_params_M"] + runs[c][0].get("teacher_params_M", 0.0)}
          for c in REAL_CONFIGS}
    off, on, ce = by["real_kd_offline"], by["real_kd_online"], by["real_ce"]
    ratios = {f"{a}/{b} {what}": x[key] / max(y[key], 1e-9)
              for a, b, x, y in (("online", "offline", on, off), ("offline", "ce", off, ce), ("online", "ce", on, ce))
              for what, key in (("step time", "step_s"), ("step CPU time", "step_cpu_s"), ("peak memory", "peak_MB"),
                                ("step peak memory", "step_peak_MB"))}
    vocab = json.loads((cache / "manifest.json").read_text())["identity"]["tokenizer"]["model_vocab_size"]
    print(f"\nteacher {teacher.name}, student = its {args.student_layers} layers; batch {args.batch_size} x "
          f"{args.seq_len} tokens ({runs['real_ce'][0]['targets']} targets), offline k={K}, vocab {vocab}, "
          f"{rounds} round(s) x {steps} step(s), {args.threads} torch thread(s) per process\n")
    print_table(list(by.values()), ["config", "params_M", "step_s", "step_cpu_s", "peak_MB", "step_peak_MB"])
    print()
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json), "cache": str(cache)},
                                         "rows": list(by.values()), "ratios": ratios, "runs": runs},
                                        indent=2, default=str))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 2 steps per configuration")
    p.add_argument("--rounds", type=int, default=3, help="fresh-process rounds per configuration")
    p.add_argument("--steps", type=int, default=3, help="measured steps per round (after 1 warm-up)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=1024, help="kdpipe's --loss-chunk-size (its default)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker; 1 makes CPU time a load-independent measure on a shared box")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations to run")
    p.add_argument("--teacher", type=Path, default=None,
                   help="a real teacher folder (e.g. SmolLM2-135M): offline vs online KD vs CE with it instead")
    p.add_argument("--student-layers", type=int, default=4, help="with --teacher: the student keeps this many layers")
    p.add_argument("--dataset", type=Path, default=SHARED_DATA / "wikitext-2" / "test.txt",
                   help="with --teacher: the text whose windows make the batch")
    p.add_argument("--worker", choices=CONFIGS + REAL_CONFIGS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker in REAL_CONFIGS:
        result = real_worker(args.worker, args.cache, args.teacher, args.student_layers, args.batch_size, args.steps,
                             args.chunk_size, args.threads)
        args.json.write_text(json.dumps(result))
        return
    if args.worker:
        result = worker(args.worker, args.cache, args.steps, args.chunk_size, args.threads)
        args.json.write_text(json.dumps(result))
        return
    if args.teacher is not None:
        real_teacher_main(args)
        return
    configs = [c for c in CONFIGS if c in args.only.split(",")]
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    cache = build_cache(args.batch_size, args.seq_len)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(rounds):
        for c in configs:
            print(f"round {r + 1}/{rounds}: {c}", file=sys.stderr, flush=True)
            runs[c].append(_run_worker(c, cache, steps, args.chunk_size, args.threads))
    rows = _summary_rows(runs)
    print(f"\nbatch {args.batch_size} x {args.seq_len} tokens, k={K}, vocab "
          f"{int(json.loads((cache / 'manifest.json').read_text())['identity']['tokenizer']['model_vocab_size'])}, "
          f"{rounds} round(s) x {steps} step(s), {args.threads} torch thread(s) per process\n")
    print_table(rows, ["config", "baseline", "params_M", "step_s", "time_vs_base", "step_cpu_s", "cpu_vs_base",
                       "peak_MB", "peak_vs_base",
                       "step_peak_MB", "step_peak_vs_base"])
    print()
    ratios = _ratios({r["config"]: r for r in rows})
    print_table([{"ratio": k, "value": v, "target": _TARGETS.get(k.split(" step")[0].split(" peak")[0], "")}
                 for k, v in ratios.items()], ["ratio", "value", "target"])
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json), "cache": str(cache)},
                                         "rows": rows, "ratios": ratios, "runs": runs}, indent=2, default=str))


def _summary_rows(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Medians per configuration, each beside its baseline (when that ran too)."""
    rows = []
    for c, c_runs in runs.items():
        rows.append({"config": c, "step_s": statistics.median(t for run in c_runs for t in run["step_times"]),
                     "step_cpu_s": statistics.median(t for run in c_runs for t in run["step_cpu_times"]),
                     "peak_MB": statistics.median(run["peak_MB"] for run in c_runs),
                     "step_peak_MB": statistics.median(run["step_peak_MB"] for run in c_runs),
                     "params_M": c_runs[0]["student_params_M"] + c_runs[0].get("teacher_params_M", 0.0)})
    by = {r["config"]: r for r in rows}
    for r in rows:
        base = by.get(BASELINE[r["config"]])
        r["baseline"] = BASELINE[r["config"]]
        for col, key in (("time_vs_base", "step_s"), ("cpu_vs_base", "step_cpu_s"), ("peak_vs_base", "peak_MB"),
                         ("step_peak_vs_base", "step_peak_MB")):
            r[col] = r[key] / max(base[key], 1e-9) if base is not None else None
    return rows


_TARGETS = {"kd_offline/ce": "<= 1.10", "kd_stream_verified/kd_stream": "<= 1.05"}
_PAIRS = [("kd_offline", "ce", ("time", "CPU time", "peak memory", "step peak memory")),
          ("kd_online", "kd_offline", ("time", "CPU time", "peak memory")),
          ("loss_chunked", "loss_full", ("time", "CPU time", "step peak memory")),
          ("kd_stream_verified", "kd_stream", ("time", "CPU time"))]
_COLUMN = {"time": "step_s", "CPU time": "step_cpu_s", "peak memory": "peak_MB", "step peak memory": "step_peak_MB"}


def _ratios(by: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The headline ratios between configurations that both ran."""
    out = {}
    for a, b, measures in _PAIRS:
        if a in by and b in by:
            name = f"{a}/{b}" if a.startswith("kd") else "loss chunked/full"
            for m in measures:
                label = f"{name} step {m}" if m in ("time", "CPU time") and a.startswith("kd") else f"{name} {m}"
                out[label] = by[a][_COLUMN[m]] / max(by[b][_COLUMN[m]], 1e-9)
    return out

if __name__ == "__main__":
    main()
