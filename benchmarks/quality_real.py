"""Distillation quality on a real pretrained teacher (issue 13): SmolLM2-135M on wikitext-2.

One command, resumable, on CPU::

    python -m benchmarks.quality --teacher-model /work/models/smollm2 \\
        --json docs/results/real-lm.json --plot docs/results/real-lm.png

(``python -m benchmarks.quality_real`` takes the same flags.) The arms are those of
``benchmarks/quality.py`` (same trainer, same student init, same steps and batch order):
CE only, online KD (``Trainer(teacher=OnlineTeacher(...))``), top-k + tail for k = 8/32/64 (one
real k=64 dump, k = 8/32 cut from it), renormalised top-64 (``--no-tail-bucket``), and
``sampled`` caches at the bytes per token of the top-k caches (one real sampled dump at the
largest draw count; fewer draws are *thinned* from it, see :func:`thinned_copy`).

The student is the teacher with 4 of its 30 decoder layers (``pipeline.train.student
.shrink_model``: layers 0, 10, 19, 29, embeddings / final norm / tied head copied), see
docs/RESULTS.md for why.

**Resumable.** Every stage writes its result under ``--cache-dir`` (default
``benchmarks/.cache/quality/real/<teacher>-<settings>``) and is skipped when it is there: the
data file, the student init, each dump and derived cache (``caches/*.json``), each arm's
training (``runs/<arm>.train.json``; an interrupted arm resumes from its last checkpoint,
saved every ``save_every`` steps) and each evaluation (``evals/<arm>.json``). Rerun the same
command to finish an interrupted run; ``--stop-after-s S`` ends cleanly after the stage that
crosses S seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import SHARED_DATA, print_table
from benchmarks.quality import (
    _result,
    dump,
    load_json,
    log,
    save_derived,
    save_json,
    train,
)
from benchmarks.quality_data import QROOT, SEED, THREADS, param_count, write_jsonl

# Sized for 2 shared CPU cores (measured before the run; see docs/RESULTS.md, "Real teacher").
REAL: dict[str, Any] = {
    "student_layers": 4,
    "max_length": 256,
    "stride": 255,  # no overlap between training windows: every stream token is a target once
    "steps": 32,
    "batch_size": 4,
    "lr": 3e-4,  # the trainer's default AdamW peak
    "warmup_steps": 4,
    "save_every": 10,  # checkpoints, so an interrupted arm resumes
    "eval_windows": 32,  # 256-token windows of wikitext-2 test (8,160 scored tokens)
    "agree_windows": 4,  # of those, for top-1 agreement / KL to the teacher
    "ks": [8, 32, 64],
    "sample_draws": 255,  # the real sampled dump (the format's maximum)
    "match": [8, 64],  # sampled arms at the bytes per token of these top-k caches
    "gsm_rows": 50,  # GSM8K test problems for answer-token perplexity (chat template)
}


class Deadline(Exception):
    """--stop-after-s was reached between two stages."""


class Budget:
    def __init__(self, seconds: float | None) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def check(self, stage: str) -> None:
        used = time.perf_counter() - self.t0
        if self.seconds is not None and used > self.seconds:
            raise Deadline(f"stopped after {used:.0f}s, before {stage}; rerun the same command to continue")


def text_lines(path: Path) -> list[str]:
    """Non-empty, non-heading lines (as ``benchmarks.common.wikitext_lines``, from any folder)."""
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data DIR (the folder holding wikitext-2/)")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("=")]


def run_name(teacher: Path, P: dict[str, Any]) -> str:
    return (f"{teacher.name}-L{P['student_layers']}-T{P['max_length']}-b{P['batch_size']}-s{P['steps']}"
            f"-lr{P['lr']:g}")


# --------------------------------------------------------------------------- data and student


def training_text(run_dir: Path, data_dir: Path, tok: Any, P: dict[str, Any]) -> tuple[Path, int]:
    """The first wikitext-2 valid paragraphs that fill ``steps x batch_size`` windows (one pass)."""
    need = P["steps"] * P["batch_size"] * P["stride"] + P["max_length"]
    lines, n = [], 0
    for ln in text_lines(data_dir / "wikitext-2" / "valid.txt"):
        lines.append(ln)
        n += len(tok(ln, add_special_tokens=False)["input_ids"]) + 1  # + EOS between documents
        if n >= need:
            break
    path = write_jsonl(run_dir / "data" / f"valid-first{len(lines)}.jsonl", [{"text": t} for t in lines])
    return path, n


def make_student(run_dir: Path, teacher_dir: Path, layers: int) -> tuple[Path, list[int]]:
    """The shared initial student: the teacher with ``layers`` decoder layers (``shrink_model``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.student import select_layers, shrink_model

    out = run_dir / "student_init"
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype="float32")
    keep = select_layers(int(teacher.config.num_hidden_layers), layers)
    if not (out / "config.json").is_file():
        student = shrink_model(teacher, layers, AutoModelForCausalLM)
        tmp = out.with_name(out.name + ".tmp")
        student.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(teacher_dir)).save_pretrained(str(tmp))
        tmp.replace(out)
    return out, keep


def eval_windows(tok: Any, data_dir: Path, P: dict[str, Any]) -> list[Any]:
    """wikitext-2 test as the dump's ``lm`` recipe builds rows (packed, EOS between documents, the
    tokenizer's BOS policy), non-overlapping windows; the first ``eval_windows`` of them."""
    from pipeline.dump.lm import lm_rows, resolve_bos

    docs = []
    for ln in text_lines(data_dir / "wikitext-2" / "test.txt"):
        docs.append(np.asarray([*tok(ln, add_special_tokens=False)["input_ids"], tok.eos_token_id], dtype=np.int32))
        if sum(len(d) for d in docs) > (P["eval_windows"] + 1) * P["max_length"]:
            break
    rows, _ = lm_rows(docs, list(range(len(docs))), max_length=P["max_length"], stride=P["max_length"] - 1,
                      bos_id=resolve_bos(tok, "auto"), pack=True)
    return [r for r in rows if len(r.input_ids) == P["max_length"]][: P["eval_windows"]]


# --------------------------------------------------------------------------- sampled caches


def thinned_copy(src: dict[str, Any], n: int, dst: Path, seed: int = SEED) -> dict[str, Any]:
    """A ``sampled`` cache of ``n`` draws per position thinned from the ``N``-draw cache ``src``.

    The N stored draws of a position are i.i.d. from the teacher; a uniformly random subset of
    n of them (without replacement; the multivariate hypergeometric on the stored counts) is
    therefore exactly an i.i.d. sample of n draws, so this is a ``--num-draws n`` dump in
    distribution, without a teacher pass. One fixed random order of the N draws per position
    (seeded) is cut at n, so caches of different n are nested. Written through ``CacheWriter``;
    bytes per token are measured on it.
    """
    import dataclasses

    from cache_format import CacheWriter, SampledBatch, open_cache

    info_path = dst.parent / f"{dst.name}.json"
    info = load_json(info_path)
    if info is not None and (dst / "manifest.json").is_file():
        return info
    reader = open_cache(src["path"])
    ident = reader.manifest.identity
    big = int(ident.encoding.num_draws)
    if not 1 <= n <= big:
        raise SystemExit(f"cannot thin {big} draws to {n}")
    ident = dataclasses.replace(ident, encoding=dataclasses.replace(ident.encoding, num_draws=n))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with CacheWriter(str(dst), ident, mode="overwrite") as writer:
        for unit, rows in enumerate(reader.iter_batches()):
            draws = []
            for r in rows:
                # expand (id, count) back into the N draws (every position's counts sum to N; padding
                # has count 0), in a random order, and keep the first n
                full = np.repeat(r.ids.ravel(), r.counts.astype(np.int64).ravel()).reshape(len(r.ids), big)
                order = np.argsort(rng.random(full.shape), axis=1)[:, :n]
                draws.append(np.take_along_axis(full, order, axis=1))
            writer.write(SampledBatch(sample_ids=[r.sample_id for r in rows], input_ids=[r.input_ids for r in rows],
                                      positions=[r.positions for r in rows], draws=np.concatenate(draws),
                                      labels=[r.label for r in rows]))
            writer.end_unit(unit)
        writer.finalize()
    return save_derived(src, dst, info_path, t0, "thinned")


def matched_sampled(run_dir: Path, big: dict[str, Any], budget: float) -> dict[str, Any]:
    """The thinned cache whose bytes per token are closest to ``budget`` (bisection on the draws;
    bytes grow with draws because the caches are nested)."""
    caches = run_dir / "caches"
    top = int(big["encoding"]["num_draws"])
    if big["bytes_per_token"] <= budget:
        return big
    lo, hi = 1, top  # bytes(lo) <= budget < bytes(hi) once lo's cache is checked
    tried: dict[int, dict[str, Any]] = {top: big}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tried[mid] = thinned_copy(big, mid, caches / f"sampled{mid}")
        if tried[mid]["bytes_per_token"] <= budget:
            lo = mid
        else:
            hi = mid
    if lo not in tried:
        tried[lo] = thinned_copy(big, lo, caches / f"sampled{lo}")
    return min((tried[lo], tried[hi]), key=lambda c: abs(math.log(c["bytes_per_token"] / budget)))


# --------------------------------------------------------------------------- the experiment


class Experiment:
    """The stages of one run, each skipped when its result is already under ``run_dir``."""

    def __init__(self, args: argparse.Namespace, P: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        self.args, self.P = args, P
        self.teacher_dir = args.teacher_model
        self.run_dir = args.cache_dir or QROOT / "real" / run_name(self.teacher_dir, P)
        self.tok = AutoTokenizer.from_pretrained(str(self.teacher_dir))
        self.budget = Budget(args.stop_after_s)
        self._teacher: Any = None
        self._teacher_logits: list[Any] | None = None
        self.rows = eval_windows(self.tok, args.data, P)
        self.results: list[dict[str, Any]] = []

    @property
    def teacher(self) -> Any:
        if self._teacher is None:
            from benchmarks.quality import load_causal

            self._teacher = load_causal(self.teacher_dir)
        return self._teacher

    def teacher_logits(self) -> list[Any]:
        """The teacher's logits on the agreement rows (kept in memory: 4 x 255 x 49k floats)."""
        if self._teacher_logits is None:
            from benchmarks.quality_eval import lm_rows_forward

            rows = self.rows[: self.P["agree_windows"]]
            self._teacher_logits = [lg for lg, _ in lm_rows_forward(self.teacher, rows)]
        return self._teacher_logits

    def evaluate(self, arm: str, model_dir: Path) -> dict[str, Any]:
        from benchmarks.quality import load_causal
        from benchmarks.quality_eval import eval_lm_rows

        path = self.run_dir / "evals" / f"{arm}.json"
        done = load_json(path)
        if done is not None:
            return done
        self.budget.check(f"evaluating {arm}")
        t0 = time.perf_counter()
        is_teacher = arm == "teacher"
        model = self.teacher if is_teacher else load_causal(model_dir)
        metrics, per = eval_lm_rows(model, self.rows, teacher_logits=None if is_teacher else self.teacher_logits(),
                                    ks=tuple(self.P["ks"]) if is_teacher else ())
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path.with_suffix(".npz"), **per)
        metrics["params"] = param_count(model)
        metrics["eval_s"] = time.perf_counter() - t0
        save_json(path, metrics)
        log(f"eval {arm}: ppl {metrics['perplexity']:.3f} acc@1 {metrics['acc@1']:.4f} ({metrics['eval_s']:.0f}s)")
        return metrics

    def per_target(self, arm: str) -> dict[str, np.ndarray]:
        with np.load(self.run_dir / "evals" / f"{arm}.npz") as z:
            return {k: z[k] for k in z.files}

    # -- stages ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        P = self.P
        self.data, self.stream_tokens = training_text(self.run_dir, self.args.data, self.tok, P)
        self.init, self.keep = make_student(self.run_dir, self.teacher_dir, P["student_layers"])
        self.base = {"teacher": str(self.teacher_dir), "task": "lm", "dataset": str(self.data),
                     "max_length": P["max_length"], "stride": P["stride"], "batch_size": 8, "device": "cpu",
                     "dtype": "float32"}
        self.tset = {"max_steps": P["steps"], "batch_size": P["batch_size"], "lr": P["lr"],
                     "warmup_steps": P["warmup_steps"], "eval_rows": 0, "save_every": P["save_every"]}

    def caches(self) -> None:
        """The real k=64 dump (k = 8, 32 cut from it); the real sampled dump and its thinned copies."""
        from benchmarks.quality import topk_caches

        P, fresh = self.P, self.args.fresh
        self.budget.check("the top-k dump")
        self.topk = topk_caches(self.run_dir, self.base, P["ks"], fresh)
        rows = self.topk[max(P["ks"])]["rows"]
        if rows < P["steps"] * P["batch_size"]:
            raise SystemExit(f"the distillation set has {rows} rows, fewer than steps x batch_size")
        self.budget.check("the sampled dump")
        n = P["sample_draws"]
        big = dump(self.run_dir, f"sampled{n}", {**self.base, "encoding": "sampled", "num_draws": n}, fresh)
        self.sampled = {k: matched_sampled(self.run_dir, big, self.topk[k]["bytes_per_token"]) for k in P["match"]}

    def plan(self) -> list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]]:
        """(arm, label, cache info, trainer settings); most informative arms first, so a run cut short
        has the comparisons that matter."""
        kmax = max(self.P["ks"])
        plan: list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]] = [
            ("ce", "student CE (no teacher)", None, {"alpha": 1.0}),
            ("online", "student online KD (full distribution)", None, {}),
            (f"topk{kmax}", f"student top-{kmax} + tail", self.topk[kmax], {}),
        ]
        for k in sorted(self.sampled, reverse=True):
            c = self.sampled[k]
            n = c["encoding"]["num_draws"]
            plan.append((f"sampled{n}", f"student sampled ({n} draws, ~top-{k} bytes)", c, {}))
        plan.append((f"topk{kmax}-renorm", f"student top-{kmax} renormalised (no tail)", self.topk[kmax],
                     {"tail_bucket": False}))
        for k in sorted(self.P["ks"]):
            if k != kmax:
                plan.append((f"topk{k}", f"student top-{k} + tail", self.topk[k], {}))
        # Diagnostic arms <arm>-alpha<A>: hard-label CE mixed in with weight A (not part of the targets).
        for name in self.args.diagnostic.split(",") if self.args.diagnostic else []:
            base, alpha = name.rsplit("-alpha", 1)
            for arm, label, cache, kw in list(plan):
                if arm == base:
                    plan.append((name, f"{label}, alpha {alpha} (diagnostic)", cache, {**kw, "alpha": float(alpha)}))
        return plan

    def arms(self) -> None:
        from pipeline.train.distill import OnlineTeacher

        wanted = set(self.args.arms.split(",")) if self.args.arms else None
        t = self.evaluate("teacher", self.teacher_dir)
        self.results.append(_result("lm", "teacher", "perplexity", t, params=t["params"], arm="teacher"))
        i = self.evaluate("init", self.init)
        self.results.append(_result("lm", f"student init (layers {self.keep} of the teacher, untrained)",
                                    "perplexity", i, params=i["params"], arm="init"))
        ref = Path(self.topk[max(self.P["ks"])]["path"])
        for arm, label, cache, kw in self.plan():
            if wanted is not None and arm not in wanted and "-alpha" not in arm:
                continue
            self.budget.check(f"training {arm}")
            online = OnlineTeacher(self.teacher) if arm.split("-alpha")[0] == "online" else None
            d, tinfo = train(self.run_dir, arm, Path(cache["path"]) if cache else ref, self.init,
                             {**self.tset, **kw}, teacher=online, fresh=self.args.fresh)
            m = self.evaluate(arm, d)
            self.results.append(_result("lm", label, "perplexity", m, params=m["params"], cache=cache,
                                        train=tinfo, arm=arm, alpha=kw.get("alpha", 0.0),
                                        train_curve=tinfo.get("curve")))

    def gsm(self) -> None:
        """GSM8K answer-token perplexity with the chat template (out of domain for the wikitext-trained
        students: how much of the instruct teacher's behaviour each arm keeps), on every model evaluated."""
        from benchmarks.quality import load_causal
        from benchmarks.quality_eval import answer_token_stats, gsm_chat_rows

        n = self.args.gsm_rows
        if not n:
            return
        rows = gsm_chat_rows(self.tok, self.args.data / "gsm8k" / "test.jsonl", n, 512)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        for r in self.results:
            arm = r["arm"]
            path = self.run_dir / "evals" / f"{arm}.gsm{n}.json"
            m = load_json(path)
            if m is None:
                self.budget.check(f"GSM8K on {arm}")
                t0 = time.perf_counter()
                model = self.teacher if arm == "teacher" else load_causal(
                    self.init if arm == "init" else self.run_dir / "runs" / arm)
                m = {**answer_token_stats(model, rows, pad, batch_size=8), "rows": n,
                     "eval_s": time.perf_counter() - t0}
                save_json(path, m)
                log(f"gsm8k {arm}: answer ppl {m['answer_perplexity']:.3f} ({m['eval_s']:.0f}s)")
            r["metrics"].update({f"gsm8k_{k}": v for k, v in m.items() if k.startswith("answer")})

    # -- diagnostics -------------------------------------------------------------------------------

    def cache_tails(self) -> dict[str, Any]:
        """Mean teacher tail mass (outside the stored ids) of the training caches, by position in the window."""
        from cache_format import open_cache

        out: dict[str, Any] = {}
        for k, c in sorted(self.topk.items()):
            tails, pos = [], []
            for r in open_cache(c["path"]).iter_rows():
                tails.append(r.tail)
                pos.append(r.positions)
            t, p = np.concatenate(tails).astype(np.float64), np.concatenate(pos)
            out[f"top{k}"] = {"mean_tail": float(t.mean()), "median_tail": float(np.median(t)),
                              "share_tail_over_0.1": float((t > 0.1).mean()), "by_position": by_position(t, p)}
        return out

    def diagnostics(self) -> dict[str, Any]:
        """Why an arm misses a target: where the teacher's mass lies, and where each student loses."""
        t = self.per_target("teacher")
        diag: dict[str, Any] = {
            "teacher_test": {"mean_entropy": float(t["entropy"].mean()),
                             "entropy_by_position": by_position(t["entropy"], t["position"]),
                             **{f"mean_tail{k}": float(t[f"tail{k}"].mean()) for k in self.P["ks"]},
                             **{f"tail{k}_by_position": by_position(t[f"tail{k}"], t["position"])
                                for k in self.P["ks"]},
                             "true_token_rank_share": rank_shares(t["rank"])},
            "training_cache_tail": self.cache_tails(),
            "nll_by_teacher_rank": {},
        }
        markup = np.concatenate([markup_mask(r.input_ids, self.tok)[np.asarray(r.positions) + 1] for r in self.rows])
        diag["wikitext_markup"] = {"share_of_targets": float(markup.mean())}
        diag["teacher_tail_tokens"] = tail_tokens(self.rows, t["rank"], self.tok, max(self.P["ks"]))
        for r in self.results:
            arm = r["arm"]
            if (self.run_dir / "evals" / f"{arm}.npz").is_file():
                nll = self.per_target(arm)["nll"]
                diag["nll_by_teacher_rank"][arm] = nll_by_rank(nll, t["rank"])
                diag["wikitext_markup"][arm] = {"perplexity_markup": float(np.exp(nll[markup].mean())),
                                                "perplexity_rest": float(np.exp(nll[~markup].mean()))}
        return diag


def tail_tokens(rows: list[Any], rank: np.ndarray, tok: Any, k: int, top: int = 12) -> dict[str, Any]:
    """The true tokens the teacher ranks at k or below (outside a top-k cache), most frequent first."""
    targets = np.concatenate([np.asarray(r.input_ids)[np.asarray(r.positions) + 1] for r in rows])
    ids, counts = np.unique(targets[rank >= k], return_counts=True)
    order = np.argsort(-counts)[:top]
    n = int((rank >= k).sum())
    return {"targets_outside": n, "share_of_targets": n / len(rank),
            "most_frequent": [{"token": tok.decode([int(ids[i])]), "count": int(counts[i]),
                               "share_of_outside": float(counts[i] / max(n, 1))} for i in order]}


def markup_mask(ids: np.ndarray, tok: Any) -> np.ndarray:
    """True at the tokens of wikitext-2's tokenisation markup: ``<unk>`` and ``@-@``/``@,@``/``@.@``
    (a teacher trained on natural text rarely predicts them; a CE student learns them from the data)."""
    pieces = [tok.convert_ids_to_tokens(int(i)) for i in ids]
    text = [tok.convert_tokens_to_string([p]) for p in pieces]
    out = np.zeros(len(ids), dtype=bool)
    for i in range(len(ids) - 2):
        a, b, c = text[i].strip(), text[i + 1], text[i + 2]
        if (a == "<" and b == "unk" and c == ">") or (a == "@" and b in "-,." and c == "@"):
            out[i : i + 3] = True
    return out


RANK_BUCKETS = ((0, 1), (1, 8), (8, 32), (32, 64), (64, None))
POSITION_BINS = ((0, 8), (8, 32), (32, 128), (128, 256))


def bucket_name(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else (f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}")


def by_position(values: np.ndarray, positions: np.ndarray) -> dict[str, float]:
    return {bucket_name(lo, hi): float(values[(positions >= lo) & (positions < hi)].mean())
            for lo, hi in POSITION_BINS if ((positions >= lo) & (positions < hi)).any()}


def rank_shares(rank: np.ndarray) -> dict[str, float]:
    return {bucket_name(lo, hi): float(((rank >= lo) & (rank < (hi or 1 << 62))).mean()) for lo, hi in RANK_BUCKETS}


def nll_by_rank(nll: np.ndarray, rank: np.ndarray) -> dict[str, float]:
    """Mean NLL of the test targets grouped by the true token's rank under the teacher, and each
    group's share of the total NLL (so the groups' contributions to log-perplexity add up)."""
    out = {}
    for lo, hi in RANK_BUCKETS:
        sel = (rank >= lo) & (rank < (hi or 1 << 62))
        out[bucket_name(lo, hi)] = float(nll[sel].mean()) if sel.any() else float("nan")
        out[f"{bucket_name(lo, hi)}:sum_share"] = float(nll[sel].sum() / len(nll))
    return out


# --------------------------------------------------------------------------- targets and output


def check_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 13's targets on test perplexity (lower is better)."""
    by = {r["arm"]: r for r in results}
    rows: list[dict[str, Any]] = []
    ce, online = by.get("ce"), by.get("online")
    cache_arms = [r for r in results if "bytes_per_token" in r and "-alpha" not in r["arm"]]
    for r in cache_arms:
        if ce is not None:
            rows.append({"target": "every cache arm beats CE", "arm": r["arm"], "value": r["value"],
                         "reference": ce["value"], "relative": r["value"] / ce["value"] - 1,
                         "met": r["value"] < ce["value"]})
    if online is not None:
        for r in cache_arms:
            bound = 0.02 if r["arm"].startswith("sampled") else 0.05 if r["arm"] == "topk64" else None
            if bound is None:
                continue
            d = r["value"] / online["value"] - 1
            rows.append({"target": f"{'sampled' if bound == 0.02 else 'top-64 + tail'} within {bound:.0%} of "
                                   "online KD", "arm": r["arm"], "value": r["value"], "reference": online["value"],
                         "relative": d, "met": d <= bound})
    return rows


COLUMNS = ["method", "perplexity", "acc@1", "acc@5", "top1_agreement", "kl_to_teacher", "bytes_per_token",
           "dump_s", "train_step_s", "gsm8k_answer_perplexity", "params"]


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        row = {**r, **r["metrics"]}
        for key in COLUMNS:
            row.setdefault(key, "")
        if row["train_step_s"] != "":
            row["train_step_s"] = round(row["train_step_s"], 2)
        if row["dump_s"] != "":
            row["dump_s"] = round(row["dump_s"])
        rows.append(row)
    return print_table(rows, COLUMNS)


def plot_diagnostics(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diag = doc["diagnostics"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    ax = axes[0]
    t = diag["teacher_test"]
    bins = list(t["entropy_by_position"])
    for k in doc["settings"]["ks"]:
        ax.plot(bins, [t[f"tail{k}_by_position"][b] for b in bins], marker="o", label=f"tail mass outside top-{k}")
    ax.set_xlabel("position in the 256-token window")
    ax.set_ylabel("teacher mass outside the top k")
    ax2 = ax.twinx()
    ax2.plot(bins, [t["entropy_by_position"][b] for b in bins], "k--", marker="s", label="entropy (nats, right)")
    ax2.set_ylabel("teacher entropy (nats)")
    ax.legend(loc="upper right", fontsize=8)
    ax2.legend(loc="lower left", fontsize=8)
    ax.set_title("teacher on wikitext-2 test: tail mass and entropy by position", fontsize=10)
    nll = diag["nll_by_teacher_rank"]
    arms = [a for a in nll if a not in ("teacher", "init", "online") and "-alpha" not in a]
    ax = axes[1]
    buckets = [b for b in nll["online"] if ":" not in b]
    width = 0.8 / len(arms)
    for i, a in enumerate(arms):
        ax.bar(np.arange(len(buckets)) + i * width,
               [nll[a][f"{b}:sum_share"] - nll["online"][f"{b}:sum_share"] for b in buckets], width, label=a)
    share = t["true_token_rank_share"]
    ax.set_xticks(np.arange(len(buckets)) + 0.4, [f"rank {b}\n({share[b]:.0%} of tokens)" for b in buckets],
                  fontsize=8)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_ylabel("contribution to mean test NLL, minus online KD's (nats)")
    ax.set_title("where students lose vs online KD: by the true token's teacher rank", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[2]
    mk = diag["wikitext_markup"]
    shown = ["teacher", "ce", "online", *arms[1:]]
    x = np.arange(len(shown))
    ax.bar(x - 0.2, [mk[a]["perplexity_rest"] for a in shown], 0.4, label="rest of the text")
    ax.bar(x + 0.2, [mk[a]["perplexity_markup"] for a in shown], 0.4,
           label=f"<unk> / @-@ markup ({mk['share_of_targets']:.0%} of tokens)")
    ax.set_xticks(x, shown, rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("test perplexity")
    ax.set_title("wikitext-2 markup vs the rest", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(doc: dict[str, Any], args: argparse.Namespace) -> None:
    from benchmarks.quality import plot

    print(f"\n## real teacher: {doc['teacher']} (wall {doc['wall_s']:.0f}s)\n")
    table(doc["results"])
    if doc["targets"]:
        print("\n### targets\n")
        print_table(doc["targets"], ["target", "arm", "value", "reference", "relative", "met"])
    if doc.get("remaining"):
        print(f"\nnot done yet: {', '.join(doc['remaining'])} (rerun the same command to continue)")
    if args.json:
        save_json(args.json, doc)
    if args.plot and len(doc["results"]) > 2:
        plot("lm", [r for r in doc["results"] if r["arm"] != "init"], args.plot)
        if doc.get("diagnostics"):
            plot_diagnostics(doc, args.plot.with_name(args.plot.stem + "-diagnostics.png"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import cache_format

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    P = dict(REAL)
    for key in ("steps", "batch_size", "eval_windows", "student_layers"):
        if getattr(args, key, None):
            P[key] = getattr(args, key)
    t0 = time.perf_counter()
    exp = Experiment(args, P)
    log(f"run folder {exp.run_dir}")
    stopped = None
    try:
        exp.prepare()
        exp.caches()
        exp.arms()
        exp.gsm()
    except Deadline as d:
        stopped = str(d)
        log(stopped)
    done = {r["arm"] for r in exp.results}
    remaining = [a for a, *_ in exp.plan() if a not in done] if hasattr(exp, "sampled") else ["everything"]
    from cache_format.shard import FORMAT_VERSION

    doc = {
        "teacher": str(args.teacher_model), "settings": P, "run_dir": str(exp.run_dir),
        "student_layers_copied": getattr(exp, "keep", None), "cache_format_version": FORMAT_VERSION,
        "cache_format_module": cache_format.__file__, "threads": THREADS, "wall_s": time.perf_counter() - t0,
        "training_stream_tokens": getattr(exp, "stream_tokens", None), "results": exp.results,
        "targets": check_targets(exp.results), "remaining": remaining, "stopped": stopped,
        "diagnostics": exp.diagnostics() if (exp.run_dir / "evals" / "teacher.npz").is_file()
        and hasattr(exp, "topk") else None,
    }
    return doc


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", type=Path, default=SHARED_DATA,
                    help="folder holding wikitext-2/{valid,test}.txt (default: ../shared/data)")
    ap.add_argument("--cache-dir", type=Path, help="run folder (default: benchmarks/.cache/quality/real/<settings>)")
    ap.add_argument("--stop-after-s", type=float, help="stop cleanly after the stage that crosses this wall time")
    ap.add_argument("--batch-size", type=int, help=f"rows per step (default {REAL['batch_size']})")
    ap.add_argument("--eval-windows", type=int, help=f"test windows scored (default {REAL['eval_windows']})")
    ap.add_argument("--gsm-rows", type=int, default=REAL["gsm_rows"],
                    help=f"GSM8K test problems for answer perplexity, chat template (default {REAL['gsm_rows']}; 0: skip)")
    ap.add_argument("--student-layers", type=int, help=f"teacher layers kept (default {REAL['student_layers']})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher-model", type=Path, help="local teacher folder (SmolLM2-135M); required unless "
                                                        "--from-json")
    ap.add_argument("--json", type=Path, help="write the run (settings, results, targets, diagnostics) here")
    ap.add_argument("--plot", type=Path, help="write the plots (PNG; also <name>-diagnostics.png)")
    ap.add_argument("--arms", help="comma-separated subset of arms (default: all)")
    ap.add_argument("--steps", type=int, help=f"optimizer steps (default {REAL['steps']})")
    ap.add_argument("--fresh", action="store_true", help="redo dumps and trainings even if cached")
    ap.add_argument("--diagnostic", help="extra arms such as online-alpha0.5,topk64-alpha0.5 (hard-label CE "
                                         "mixed in), comma-separated; not part of the targets")
    ap.add_argument("--from-json", type=Path, help="reprint the table, targets and plots of an earlier --json")
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.teacher_model is None and args.from_json is None:
        ap.error("--teacher-model DIR is required (or --from-json FILE to reprint a run)")
    doc = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    report(doc, args)


if __name__ == "__main__":
    sys.exit(main())
