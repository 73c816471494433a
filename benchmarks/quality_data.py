"""Data and teachers for ``benchmarks/quality.py`` (issue 6): real data, small models, cached.

Everything is built from ``../shared/data`` (never copied into the repo) and kept under
``benchmarks/.cache/quality`` (git-ignored), so a rerun of an experiment reuses its
tokenizer, teacher and derived data files. Every build is seeded.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CACHE_DIR, SHARED_DATA, wikitext_lines

QROOT = CACHE_DIR / "quality"
SEED = 0
# One torch thread: on the shared, oversubscribed 2-core machine (load 8-11) two OpenMP threads
# spin at every barrier and a student step measured 4-7 s with 2 threads vs 0.5-0.7 s with 1.
THREADS = int(os.environ.get("KDPIPE_QUALITY_THREADS", "1"))

# Sizes, chosen for 2 shared CPU cores (see docs/RESULTS.md, "Setup").
LM_VOCAB = 2048
LM_TEACHER = {"hidden_size": 128, "num_layers": 2}
LM_TEACHER_TRAIN = {"steps": 400, "batch_size": 16, "seq_len": 128, "lr": 2e-3}
CLS_VOCAB = 2048
CLS_TEACHER = {"hidden_size": 128, "num_layers": 2}
CLS_TEACHER_TRAIN = {"epochs": 2, "batch_size": 32, "lr": 1e-3}
GSM_VOCAB = 2048
GSM_TEACHER = {"hidden_size": 128, "num_layers": 2}
GSM_TEACHER_TRAIN = {"steps": 300, "batch_size": 8, "seq_len": 256, "lr": 2e-3}
# The prompt/response format the GSM8K teacher is trained on; the reasoning dump recipe
# must use the same template (passed to run_dump explicitly).
GSM_PROMPT = "Question: {question}\nAnswer: "


def _set_threads() -> None:
    import torch

    torch.set_num_threads(THREADS)


def param_count(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- raw data


def sst2(split: str) -> list[tuple[int, str]]:
    """SST-2 ``train``/``dev``/``test`` as (label, sentence)."""
    path = SHARED_DATA / "sst2" / f"stsa.binary.{split}"
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            label, text = line.split(" ", 1)
            rows.append((int(label), text))
    return rows


def gsm8k(split: str) -> list[dict[str, str]]:
    path = SHARED_DATA / "gsm8k" / f"{split}.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def gsm8k_final_number(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def wikitext_sentences(split: str = "valid", min_words: int = 6, max_words: int = 40) -> list[str]:
    """Lower-cased wikitext sentences (unlabeled text for the DistilBERT-style SST-2 arm)."""
    out = []
    for para in wikitext_lines(split):
        for sent in para.split(" . "):
            words = sent.split()
            if min_words <= len(words) <= max_words and "<unk>" not in sent:
                out.append(" ".join(words).lower() + " .")
    return out


# --------------------------------------------------------------------------- helpers


def _done(folder: Path) -> dict[str, Any] | None:
    f = folder / "done.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _finish(folder: Path, model: Any, tok: Any, info: dict[str, Any]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    info["params"] = param_count(model)
    (folder / "done.json").write_text(json.dumps(info, indent=2))
    return info


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    return path


# --------------------------------------------------------------------------- LM teacher


def lm_task_dir() -> Path:
    """Teacher, caches and runs of the LM task, per teacher training length."""
    return QROOT / "lm" / f"teacher-steps{LM_TEACHER_TRAIN['steps']}"


def gsm_task_dir() -> Path:
    return QROOT / "reasoning" / f"teacher-steps{GSM_TEACHER_TRAIN['steps']}"


def lm_teacher() -> tuple[Path, dict[str, Any]]:
    """BPE (2k) + 2-layer width-128 Llama trained on wikitext-2 ``valid``."""
    folder = lm_task_dir() / "teacher"
    info = _done(folder)
    if info is not None:
        return folder, info
    _set_threads()
    import torch

    from pipeline.demo.toy import build_llama, build_tokenizer, token_stream, train_causal_lm

    torch.manual_seed(SEED)
    lines = wikitext_lines("valid")
    tok = build_tokenizer(lines, vocab_size=LM_VOCAB)
    model = build_llama(len(tok), tokenizer=tok, seed=SEED, **LM_TEACHER)
    stream = token_stream(tok, lines)
    t0 = time.perf_counter()
    losses = train_causal_lm(model, stream, seed=SEED, **LM_TEACHER_TRAIN)
    return folder, _finish(folder, model, tok, {
        "data": "wikitext-2 valid", "train_tokens_available": len(stream), **LM_TEACHER, **LM_TEACHER_TRAIN,
        "tokens_seen": LM_TEACHER_TRAIN["steps"] * LM_TEACHER_TRAIN["batch_size"] * LM_TEACHER_TRAIN["seq_len"],
        "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])), "train_s": time.perf_counter() - t0,
    })


# --------------------------------------------------------------------------- SST-2 teacher


def cls_tokenizer() -> Any:
    folder = QROOT / "cls" / "tokenizer"
    from transformers import AutoTokenizer

    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    from pipeline.demo.toy import build_tokenizer

    texts = [t for _, t in sst2("train")] + wikitext_sentences("valid")
    return build_tokenizer(texts, vocab_size=CLS_VOCAB, out_dir=folder)


def encode_batch(tok: Any, texts: list[str], max_length: int = 48) -> dict[str, Any]:
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def train_classifier(
    model: Any, tok: Any, texts: list[str], labels: list[int] | None, *, epochs: int, batch_size: int,
    lr: float, seed: int = SEED, soft: Any = None, alpha: float = 1.0, temperature: float = 1.0,
) -> list[float]:
    """Plain classifier loop (teacher training, and the online arms of the classification task).

    ``soft`` (float tensor ``[N, C]`` of teacher logits) adds ``(1 - alpha)`` x T^2 x KL(teacher_T || student_T).
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    n = len(texts)
    steps = epochs * math.ceil(n / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            batch = encode_batch(tok, [texts[j] for j in idx])
            logits = model(**batch).logits.float()
            loss = logits.new_zeros(())
            if labels is not None and alpha > 0:
                y = torch.tensor([labels[j] for j in idx])
                loss = loss + alpha * F.cross_entropy(logits, y)
            if soft is not None and alpha < 1:
                t = soft[idx].float()
                kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(t / temperature, -1),
                              log_target=True, reduction="batchmean")
                loss = loss + (1 - alpha) * temperature**2 * kl
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    model.eval()
    return losses


def classifier_logits(model: Any, tok: Any, texts: list[str], batch_size: int = 128) -> Any:
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            outs.append(model(**encode_batch(tok, texts[i : i + batch_size])).logits.float())
    return torch.cat(outs)


def cls_accuracy(model: Any, tok: Any, rows: list[tuple[int, str]]) -> float:
    from pipeline.eval.metrics import accuracy

    logits = classifier_logits(model, tok, [t for _, t in rows])
    return accuracy(logits.argmax(-1).tolist(), [y for y, _ in rows])


def cls_teacher() -> tuple[Path, dict[str, Any]]:
    """2-layer width-128 Llama sequence classifier trained on SST-2 train (dev accuracy recorded)."""
    folder = QROOT / "cls" / "teacher"
    info = _done(folder)
    if info is not None:
        return folder, info
    _set_threads()
    import torch

    from pipeline.demo.toy import build_llama

    tok = cls_tokenizer()
    model = build_llama(len(tok), num_labels=2, tokenizer=tok, seed=SEED, **CLS_TEACHER)
    train = sst2("train")
    t0 = time.perf_counter()
    losses = train_classifier(model, tok, [t for _, t in train], [y for y, _ in train], seed=SEED,
                              **CLS_TEACHER_TRAIN)
    torch.manual_seed(SEED)
    return folder, _finish(folder, model, tok, {
        "data": "sst2 train", **CLS_TEACHER, **CLS_TEACHER_TRAIN, "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-20:])), "train_s": time.perf_counter() - t0,
        "dev_accuracy": cls_accuracy(model, tok, sst2("dev")),
    })


# --------------------------------------------------------------------------- GSM8K teacher


def gsm_text(row: dict[str, str]) -> tuple[str, str]:
    return GSM_PROMPT.format(question=row["question"]), row["answer"]


def gsm_teacher() -> tuple[Path, dict[str, Any]]:
    """BPE (2k) on GSM8K train + 2-layer width-128 Llama trained on its prompt+answer texts."""
    folder = gsm_task_dir() / "teacher"
    info = _done(folder)
    if info is not None:
        return folder, info
    _set_threads()
    import torch

    from pipeline.demo.toy import build_llama, build_tokenizer, token_stream, train_causal_lm

    torch.manual_seed(SEED)
    rows = gsm8k("train")
    texts = ["".join(gsm_text(r)) for r in rows]
    tok = build_tokenizer(texts, vocab_size=GSM_VOCAB)
    model = build_llama(len(tok), tokenizer=tok, seed=SEED, **GSM_TEACHER)
    stream = token_stream(tok, texts)
    t0 = time.perf_counter()
    losses = train_causal_lm(model, stream, seed=SEED, **GSM_TEACHER_TRAIN)
    return folder, _finish(folder, model, tok, {
        "data": "gsm8k train (prompt + answer)", "train_tokens_available": len(stream), **GSM_TEACHER,
        **GSM_TEACHER_TRAIN,
        "tokens_seen": GSM_TEACHER_TRAIN["steps"] * GSM_TEACHER_TRAIN["batch_size"] * GSM_TEACHER_TRAIN["seq_len"],
        "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])), "train_s": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    import sys

    which = sys.argv[1:] or ["lm", "cls", "reasoning"]
    for w in which:
        fn = {"lm": lm_teacher, "cls": cls_teacher, "reasoning": gsm_teacher}[w]
        t0 = time.perf_counter()
        path, info = fn()
        print(w, path, json.dumps(info), f"{time.perf_counter() - t0:.1f}s", flush=True)
