"""Evaluation helpers for ``benchmarks/quality.py``: the seed project's metrics on held-out real data.

All metrics are computed with ``pipeline.eval.metrics`` (the functions ``kdpipe eval`` uses):
LM perplexity / acc@1 / acc@5 (``lm_token_stats``), SST-2 accuracy (``accuracy``), GSM8K exact
match (``gsm8k_exact_match``), plus answer-token perplexity for GSM8K, and teacher-student
agreement (``agreement_dense``) where a teacher is given.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.common import wikitext_lines
from benchmarks.quality_data import gsm8k, sst2

LM_EVAL_WINDOW = 128


def lm_eval_windows(tok: Any, max_windows: int | None) -> np.ndarray:
    """wikitext-2 ``test`` as packed windows of 128 tokens (same packing as the dump's lm recipe)."""
    from pipeline.demo.toy import token_stream

    stream = token_stream(tok, wikitext_lines("test"))
    n = len(stream) // LM_EVAL_WINDOW
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * LM_EVAL_WINDOW].reshape(n, LM_EVAL_WINDOW)


def eval_lm(model: Any, windows: np.ndarray, teacher: Any = None, batch_size: int = 32) -> dict[str, float]:
    import torch

    from pipeline.eval.metrics import AgreementStats, LMStats, agreement_dense, lm_token_stats

    stats, agree = LMStats(), AgreementStats()
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            x = torch.as_tensor(windows[i : i + batch_size], dtype=torch.long)
            logits = model(input_ids=x).logits[:, :-1]
            stats.add(lm_token_stats(logits, x[:, 1:], torch.ones_like(x[:, 1:], dtype=torch.bool)))
            if teacher is not None:
                t = teacher(input_ids=x).logits[:, :-1]
                agree.add(agreement_dense(logits.reshape(-1, logits.shape[-1]), t.reshape(-1, t.shape[-1])))
    out = stats.summary()
    if teacher is not None:
        out.update(agree.summary())
    return out


def eval_cls(model: Any, tok: Any, split: str = "test", teacher: Any = None) -> dict[str, float]:
    import torch

    from benchmarks.quality_data import classifier_logits
    from pipeline.eval.metrics import accuracy

    rows = sst2(split)
    texts = [t for _, t in rows]
    logits = classifier_logits(model, tok, texts)
    out: dict[str, float] = {"accuracy": accuracy(logits.argmax(-1).tolist(), [y for y, _ in rows]),
                             "examples": len(rows)}
    if teacher is not None:
        t = classifier_logits(teacher, tok, texts)
        out["top1_agreement"] = float((t.argmax(-1) == logits.argmax(-1)).float().mean())
        lp, lq = torch.log_softmax(t, -1), torch.log_softmax(logits, -1)
        out["kl_to_teacher"] = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return out


def gsm_rows(tok: Any, split: str, limit: int | None, template: str, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + EOS) exactly as the dump's reasoning recipe builds them."""
    from pipeline.dump.tasks import fit_prompt_response

    rows = gsm8k(split)[:limit] if limit else gsm8k(split)
    out = []
    for r in rows:
        p = tok(template.replace("{text}", r["question"]))["input_ids"]
        a = [*tok(" " + r["answer"].strip(), add_special_tokens=False)["input_ids"], tok.eos_token_id]
        p, a, _ = fit_prompt_response(p, a, max_length, tok.bos_token_id)
        out.append((p, a))
    return out


def eval_reasoning(
    model: Any, tok: Any, *, template: str, max_length: int, ppl_limit: int, em_limit: int,
    max_new_tokens: int = 160, teacher: Any = None, batch_size: int = 16,
) -> dict[str, float]:
    """Answer-token perplexity (teacher forcing on the reference answers) and greedy exact match."""
    import torch

    from pipeline.eval.metrics import gsm8k_exact_match

    rows = gsm_rows(tok, "test", ppl_limit, template, max_length)
    out = answer_token_stats(model, rows, tok.pad_token_id, teacher=teacher, batch_size=batch_size)
    if em_limit <= 0:
        return out
    # Greedy generation for exact match (left-padded, one batch: generation is step-bound on CPU).
    pad = tok.pad_token_id
    batch_size = max(batch_size, em_limit)
    refs = [r["answer"] for r in gsm8k("test")[:em_limit]]
    prompts = [p for p, _ in gsm_rows(tok, "test", em_limit, template, max_length)]
    preds = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            L = max(len(p) for p in chunk)
            x = torch.full((len(chunk), L), pad, dtype=torch.long)
            m = torch.zeros((len(chunk), L), dtype=torch.long)
            for j, p in enumerate(chunk):
                x[j, L - len(p) :] = torch.tensor(p)
                m[j, L - len(p) :] = 1
            gen = model.generate(input_ids=x, attention_mask=m, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tok.eos_token_id)
            preds += tok.batch_decode(gen[:, L:], skip_special_tokens=True)
    out["exact_match"] = gsm8k_exact_match(preds, refs)
    out["em_examples"] = len(refs)
    out["sample_prediction"] = preds[0][:300] if preds else ""
    return out


# --------------------------------------------------------------------------- real teacher (issue 13)


def _row_batches(rows: list[Any], batch_size: int) -> Any:
    """``(input_ids [B, T], [(row, positions)])`` for rows of equal length (the dump's LM rows)."""
    import torch

    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        yield torch.as_tensor(np.stack([r.input_ids for r in chunk]), dtype=torch.long), chunk


def lm_rows_forward(model: Any, rows: list[Any], batch_size: int = 4) -> Any:
    """Per row: the model's logits at the row's target positions (``[n, V]``) and the targets (``[n]``)."""
    import torch

    model.eval()
    with torch.no_grad():
        for x, chunk in _row_batches(rows, batch_size):
            logits = model(input_ids=x).logits
            for j, r in enumerate(chunk):
                pos = torch.as_tensor(r.positions, dtype=torch.long)
                yield logits[j, pos].float(), x[j, pos + 1]


def eval_lm_rows(model: Any, rows: list[Any], *, teacher_logits: list[Any] | None = None,
                 ks: tuple[int, ...] = (), batch_size: int = 4) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Perplexity, acc@1, acc@5 (``pipeline.eval.metrics.lm_token_stats``) over the rows' targets.

    Also per target: the NLL, and with ``ks`` (the teacher's own evaluation) the entropy, the
    rank of the true token and the mass outside the top k. ``teacher_logits`` (``[n, V]`` per row,
    for the first rows) adds top-1 agreement and KL(teacher || student) on those rows.
    """
    import torch

    from pipeline.eval.metrics import AgreementStats, LMStats, agreement_dense, lm_token_stats

    stats, agree = LMStats(), AgreementStats()
    per: dict[str, list[np.ndarray]] = {"nll": [], "position": []}
    if ks:
        per.update({key: [] for key in ("entropy", "rank", *(f"tail{k}" for k in ks))})
    for i, (logits, y) in enumerate(lm_rows_forward(model, rows, batch_size)):
        stats.add(lm_token_stats(logits[None], y[None], torch.ones_like(y, dtype=torch.bool)[None]))
        lp = torch.log_softmax(logits, -1)
        per["nll"].append(-lp.gather(1, y[:, None])[:, 0].numpy())
        per["position"].append(np.asarray(rows[i].positions))
        if ks:
            per["entropy"].append(-(lp.exp() * lp).sum(-1).numpy())
            per["rank"].append((lp > lp.gather(1, y[:, None])).sum(-1).numpy())
            top = lp.topk(max(ks), dim=-1).values.exp()
            for k in ks:
                per[f"tail{k}"].append((1 - top[:, :k].sum(-1)).clamp_min(0).numpy())
        if teacher_logits is not None and i < len(teacher_logits):
            agree.add(agreement_dense(logits, teacher_logits[i]))
    out = stats.summary()
    if agree.positions:
        out.update(agree.summary())
    return out, {k: np.concatenate(v) for k, v in per.items()}


def answer_token_stats(model: Any, rows: list[tuple[list[int], list[int]]], pad: int, *, teacher: Any = None,
                       batch_size: int = 16) -> dict[str, float]:
    """Answer-token perplexity and acc@1 under teacher forcing on (prompt ids, answer ids) rows."""
    import torch

    from pipeline.eval.metrics import AgreementStats, LMStats, agreement_dense, lm_token_stats

    stats, agree = LMStats(), AgreementStats()
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            T = max(len(p) + len(a) for p, a in chunk)
            x = torch.full((len(chunk), T), pad, dtype=torch.long)
            m = torch.zeros((len(chunk), T), dtype=torch.long)
            tm = torch.zeros((len(chunk), T - 1), dtype=torch.bool)
            for j, (p, a) in enumerate(chunk):
                ids = p + a
                x[j, : len(ids)] = torch.tensor(ids)
                m[j, : len(ids)] = 1
                tm[j, len(p) - 1 : len(ids) - 1] = True  # positions predicting answer tokens
            logits = model(input_ids=x, attention_mask=m).logits[:, :-1]
            stats.add(lm_token_stats(logits, x[:, 1:], tm))
            if teacher is not None:
                t = teacher(input_ids=x, attention_mask=m).logits[:, :-1]
                agree.add(agreement_dense(logits[tm], t[tm]))
    s = stats.summary()
    out: dict[str, float] = {"answer_perplexity": s["perplexity"], "answer_acc@1": s["acc@1"],
                             "answer_tokens": s["tokens"]}
    if teacher is not None:
        out.update(agree.summary())
    return out


def gsm_chat_rows(tok: Any, path: Any, limit: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """GSM8K (prompt, answer) ids with the tokenizer's chat template: the question as the user turn,
    the reference answer + EOS as the assistant's (the way an instruct teacher is prompted)."""
    import json

    from pipeline.dump.tasks import fit_prompt_response

    out = []
    for line in path.read_text().splitlines()[:limit]:
        r = json.loads(line)
        text = tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                       tokenize=False)
        p = tok(text, add_special_tokens=False)["input_ids"]
        a = [*tok(r["answer"].strip(), add_special_tokens=False)["input_ids"], tok.eos_token_id]
        p, a, _ = fit_prompt_response(p, a, max_length, tok.bos_token_id)
        out.append((p, a))
    return out
