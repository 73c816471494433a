"""Pure metric functions for ``kdpipe eval``: no I/O, no models, no global state left behind.

Text metrics reproduce what HF ``evaluate`` reports without loading anything from the hub
(``evaluate.load`` fails offline):

* ``bleu`` is evaluate's "bleu": the tensorflow/nmt corpus BLEU (max order 4, no smoothing)
  over sacrebleu's ``13a`` tokenization, split on whitespace.
* ``rouge`` is evaluate's "rouge": google-research ``rouge-score`` F-measures (no stemmer,
  its default tokenizer), aggregated with its ``BootstrapAggregator`` and reported as
  ``mid.fmeasure``. evaluate draws the bootstrap from numpy's global RNG; we seed a
  private draw instead so the same inputs always give the same number.

Tensor metrics (``lm_token_stats``, ``agreement_*``) take torch tensors of one batch and
return sums, so callers add them up over batches and divide once at the end.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Self

import numpy as np

if TYPE_CHECKING:
    import torch

# evaluate's "bleu" defaults (tensorflow/nmt): 4-gram precision, no smoothing.
BLEU_MAX_ORDER = 4
# evaluate's "rouge" defaults.
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# Seed of the private bootstrap draw behind ROUGE's ``mid`` (evaluate uses numpy's global RNG).
ROUGE_BOOTSTRAP_SEED = 0
# Sampled caches pad each row's unique ids with log-prob -1e9 (cache_format.batches.DecodedRow).
_PAD_LOGPROB = -1e8


# --------------------------------------------------------------------------- classification


def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Fraction of ``predictions`` equal to ``labels`` (0.0 for no examples)."""
    _check_same_length(predictions, labels, "predictions", "labels")
    if not labels:
        return 0.0
    return sum(int(p == t) for p, t in zip(predictions, labels, strict=True)) / len(labels)


class _RunningSums:
    """For dataclasses of sums: ``add`` adds every field of another batch's sums into this one."""

    def add(self, other: Self) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# --------------------------------------------------------------------------- language modelling


@dataclass
class LMStats(_RunningSums):
    """Running sums for perplexity and next-token accuracy over scored tokens."""

    nll_sum: float = 0.0
    tokens: int = 0
    correct_top1: int = 0
    correct_top5: int = 0

    def summary(self) -> dict[str, float]:
        return {
            "perplexity": perplexity(self.nll_sum, self.tokens),
            "acc@1": self.correct_top1 / self.tokens if self.tokens else 0.0,
            "acc@5": self.correct_top5 / self.tokens if self.tokens else 0.0,
            "tokens": self.tokens,
        }


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood in nats); ``inf`` when nothing was scored."""
    if tokens <= 0:
        return math.inf
    return math.exp(nll_sum / tokens)


def lm_token_stats(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> LMStats:
    """Sums over one batch: ``logits[b, t]`` predicts ``labels[b, t]`` where ``mask[b, t]``.

    ``logits`` is ``[B, T, V]``; ``labels`` and ``mask`` are ``[B, T]`` (labels already
    shifted: the caller passes ``input_ids[:, 1:]`` against ``logits[:, :-1]``).
    """
    import torch

    mask = mask.bool()
    sel_logits = logits[mask].float()  # [N, V]: only scored positions, so memory is N x V
    sel_labels = labels[mask].long()
    if sel_labels.numel() == 0:
        return LMStats()
    nll = torch.nn.functional.cross_entropy(sel_logits, sel_labels, reduction="sum")
    k = min(5, sel_logits.shape[-1])
    top = sel_logits.topk(k, dim=-1).indices
    hits = top == sel_labels[:, None]
    return LMStats(
        nll_sum=float(nll),
        tokens=int(sel_labels.numel()),
        correct_top1=int(hits[:, 0].sum()),
        correct_top5=int(hits.any(dim=-1).sum()),
    )


# --------------------------------------------------------------------------- teacher-student agreement


@dataclass
class AgreementStats(_RunningSums):
    """Running sums of top-1 agreement and KL(teacher || student) over compared positions."""

    positions: int = 0
    top1_agree: int = 0
    kl_sum: float = 0.0

    def summary(self) -> dict[str, float]:
        n = self.positions
        return {
            "top1_agreement": self.top1_agree / n if n else 0.0,
            "kl_to_teacher": self.kl_sum / n if n else 0.0,
            "agreement_positions": n,
        }


def agreement_dense(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> AgreementStats:
    """Top-1 agreement and KL(teacher || student) from two ``[N, V]`` full distributions."""
    import torch

    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; the two models must share a vocabulary"
        )
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)
    t_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(dim=-1)
    agree = s_logp.argmax(dim=-1) == t_logp.argmax(dim=-1)
    return AgreementStats(positions=int(kl.numel()), top1_agree=int(agree.sum()), kl_sum=float(kl.sum()))


def agreement_sparse(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor | None = None,
) -> AgreementStats:
    """Agreement with a cached teacher: its top-k ``ids``/``logprobs`` ``[N, k]`` plus tail mass ``[N]``.

    KL is taken over the k+1 buckets the cache describes (the k stored tokens and "all
    others"), the same distribution the KD loss trains on; with ``tail=None`` it is
    1 - sum(exp(logprobs)). Top-1 agreement compares the student's argmax with the
    teacher's most likely stored token. Padding columns are ignored: id < 0, or a log-prob
    at or below -1e8 (how sampled caches pad rows to their largest unique count).
    """
    import torch

    s_logp = torch.log_softmax(student_logits.float(), dim=-1)  # [N, V]
    valid = (teacher_ids >= 0) & (teacher_logprobs > _PAD_LOGPROB)
    ids = teacher_ids.clamp(min=0).long()
    t_lp = teacher_logprobs.float().masked_fill(~valid, -math.inf)
    t_p = t_lp.exp()
    s_lp_k = s_logp.gather(-1, ids).masked_fill(~valid, -math.inf)
    # Teacher term over the stored tokens; 0 * (-inf) is avoided by the where().
    kl_k = torch.where(valid, t_p * (t_lp - s_lp_k), torch.zeros_like(t_p)).sum(-1)
    tail = (1.0 - t_p.sum(-1)) if teacher_tail is None else teacher_tail.float()
    tail = tail.clamp(min=0.0)
    s_tail = (1.0 - s_lp_k.exp().sum(-1)).clamp(min=1e-12)
    kl_tail = torch.where(tail > 0, tail * (torch.log(tail.clamp(min=1e-30)) - torch.log(s_tail)),
                          torch.zeros_like(tail))
    kl = kl_k + kl_tail
    teacher_top1 = ids.gather(-1, t_lp.argmax(dim=-1, keepdim=True))[:, 0]
    agree = s_logp.argmax(dim=-1) == teacher_top1
    return AgreementStats(positions=int(kl.numel()), top1_agree=int(agree.sum()), kl_sum=float(kl.sum()))


# --------------------------------------------------------------------------- BLEU (evaluate's "bleu")


def _tokenize_13a(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    # evaluate's copy of this tokenizer returns the split tokens; sacrebleu's returns them joined.
    return Tokenizer13a()(text).split()


def _ngram_counts(tokens: Sequence[str], max_order: int) -> collections.Counter[tuple[str, ...]]:
    counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for order in range(1, max_order + 1):
        for i in range(len(tokens) - order + 1):
            counts[tuple(tokens[i : i + order])] += 1
    return counts


def bleu(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    max_order: int = BLEU_MAX_ORDER,
) -> dict[str, Any]:
    """Corpus BLEU exactly as evaluate's "bleu" reports it (value in [0, 1], not sacrebleu's 0-100).

    ``references`` is one string per prediction or a list of strings per prediction.
    Returns ``bleu``, ``precisions``, ``brevity_penalty``, ``length_ratio``,
    ``translation_length`` and ``reference_length`` like evaluate does.
    """
    refs = _as_multi_references(predictions, references)
    matches = [0] * max_order
    possible = [0] * max_order
    ref_len = 0
    hyp_len = 0
    for pred, ref_list in zip(predictions, refs, strict=True):
        hyp = _tokenize_13a(pred)
        ref_toks = [_tokenize_13a(r) for r in ref_list]
        ref_len += min(len(r) for r in ref_toks)
        hyp_len += len(hyp)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for r in ref_toks:
            merged |= _ngram_counts(r, max_order)
        overlap = _ngram_counts(hyp, max_order) & merged
        for ngram, count in overlap.items():
            matches[len(ngram) - 1] += count
        for order in range(1, max_order + 1):
            if len(hyp) - order + 1 > 0:
                possible[order - 1] += len(hyp) - order + 1
    precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible, strict=True)]
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    if ref_len == 0 or hyp_len == 0:
        # evaluate's current nmt_bleu: an empty side scores 0 instead of dividing by zero.
        ratio, bp = 0.0, 0.0
    else:
        ratio = hyp_len / ref_len
        bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return {
        "bleu": geo_mean * bp,
        "precisions": precisions,
        "brevity_penalty": bp,
        "length_ratio": ratio,
        "translation_length": hyp_len,
        "reference_length": ref_len,
    }


# --------------------------------------------------------------------------- ROUGE (evaluate's "rouge")


def rouge(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    rouge_types: Sequence[str] = ROUGE_TYPES,
    seed: int = ROUGE_BOOTSTRAP_SEED,
) -> dict[str, float]:
    """ROUGE F-measures exactly as evaluate's "rouge" reports them (``mid`` of the bootstrap).

    One reference string per prediction uses ``score``; a list per prediction uses
    ``score_multi`` (best reference), as evaluate does.
    """
    from rouge_score import rouge_scorer, scoring

    _check_same_length(predictions, references, "predictions", "references")
    if not predictions:
        return {t: 0.0 for t in rouge_types}
    multi = not isinstance(references[0], str)
    scorer = rouge_scorer.RougeScorer(rouge_types=list(rouge_types), use_stemmer=False)
    aggregator = scoring.BootstrapAggregator()
    for ref, pred in zip(references, predictions, strict=True):
        aggregator.add_scores(scorer.score_multi(list(ref), pred) if multi else scorer.score(ref, pred))
    result = _with_numpy_seed(seed, aggregator.aggregate)
    return {key: float(result[key].mid.fmeasure) for key in rouge_types}


def _with_numpy_seed(seed: int, fn: Any) -> Any:
    """Run ``fn`` with numpy's global RNG seeded, then restore the caller's RNG state."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return fn()
    finally:
        np.random.set_state(state)


# --------------------------------------------------------------------------- GSM8K exact match

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_final_number(text: str) -> str | None:
    """The answer number of a GSM8K-style text, normalized (``"1,000.50"`` -> ``"1000.5"``).

    GSM8K answers end with ``#### <number>``; when a generation has no ``####`` we take the
    last number it contains (what small models usually write). ``None`` if there is none.
    """
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail.replace("$", ""))
    if not numbers:
        return None
    # After ####, the first number is the answer; without ####, the last one is.
    raw = numbers[0] if "####" in text else numbers[-1]
    return normalize_number(raw)


def normalize_number(raw: str) -> str | None:
    """Canonical form of a number string: no commas, no trailing zeros, ``-0`` -> ``0``."""
    cleaned = raw.replace(",", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gsm8k_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions whose final number equals the reference's ``#### n``."""
    _check_same_length(predictions, references, "predictions", "references")
    if not references:
        return 0.0
    hits = 0
    for pred, ref in zip(predictions, references, strict=True):
        want = extract_final_number(ref)
        hits += int(want is not None and extract_final_number(pred) == want)
    return hits / len(references)


# --------------------------------------------------------------------------- helpers


def count_parameters(model: Any) -> int:
    """Number of parameters of a torch module (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def format_params(n: int) -> str:
    """Human-readable parameter count like the seed table: ``14.4M``, ``1.5B``, ``980K``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _as_multi_references(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> list[list[str]]:
    _check_same_length(predictions, references, "predictions", "references")
    out = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, refs in enumerate(out):
        if not refs:
            raise ValueError(f"references[{i}] is an empty list; give at least one reference per prediction")
    return out


def _check_same_length(a: Sequence[Any], b: Sequence[Any], name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} items but {name_b} has {len(b)}; they must pair up one to one")


__all__ = [
    "AgreementStats",
    "LMStats",
    "accuracy",
    "agreement_dense",
    "agreement_sparse",
    "bleu",
    "count_parameters",
    "extract_final_number",
    "format_params",
    "gsm8k_exact_match",
    "lm_token_stats",
    "normalize_number",
    "perplexity",
    "rouge",
]
