"""Sparse knowledge-distillation losses and the chunked student log-softmax.

Shapes use ``N`` = number of target positions (already gathered, no padding), ``k`` =
entries stored per position, ``V`` = student vocabulary, ``H`` = hidden size,
``B`` = rows and ``C`` = classes.

**Buckets.** A cached position is a distribution over ``k + 1`` buckets: the ``k``
stored token ids (teacher log-probs ``t_logp``) and one *tail* bucket holding the
teacher's mass outside them (``tail``). The student is mapped onto the same buckets:
``log q`` at the stored ids, and its own mass outside them,
``log(1 - sum q_ids) = log1p(-exp(logsumexp(log q_ids)))``. Every divergence below is
computed over these ``k + 1`` buckets, so with ``k = V`` it is the full-vocabulary
divergence. Entries marked invalid (``valid`` false, e.g. padding of a ``sampled``
position with fewer unique draws) are dropped from both sides. The student's tail is
clamped below at ``TAIL_EPS`` (float32 cannot resolve less); where the teacher's stored
tail is exactly 0 (``k = V``, or a sampled cache) the tail bucket is dropped from both sides.

**Temperature** ``T`` acts identically on both bucket distributions: each bucket's
probability is raised to ``1/T`` and the ``k + 1`` buckets are renormalised
(``log_softmax(log_p / T)``). With ``k = V`` this is exactly ``softmax(z / T)``; for
``k < V`` the tail is tempered as one outcome (for ``T > 1`` that gives the tail less
mass than tempering its tokens one by one would). Losses are multiplied by ``T**2``
(Hinton et al.) so gradient magnitudes do not depend on ``T``.

**Sampled caches** store tokens drawn from the teacher with counts ``c_j`` out of
``N_draws``; ``t_logp = log(c_j / N_draws)`` and no tail. The estimator
``sum_j (c_j / N_draws) (log(c_j / N_draws) - log q_j)`` has the unbiased gradient of
the forward KL (its value carries a plug-in entropy bias, constant for the student).
Only forward KL (and CE) is supported there: reverse KL, JSD and TVD need the teacher's
probability of tokens that were never drawn, and temperature needs the teacher's logits.

**Where the rest lives.** This module holds the small pure functions (per-position losses
over sparse targets, the bucket mapping, tempering) and the target structures. The loss as
a module — from the student's last hidden state to the loss, chunked so no ``[N, V]``
tensor is ever held — is :class:`pipeline.train.kd_loss.SparseKDLoss`.

Invalid settings raise :class:`LossSettingError` (a ``ValueError`` naming the
:class:`LossSpec` field); the trainer turns it into an error naming the flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

LOSS_KINDS = ("fkl", "rkl", "jsd", "tvd")
# A floor for log-probabilities of empty buckets: exp(-1e4) is exactly 0 in float32, so
# 0 * (finite) terms vanish instead of turning into NaN through 0 * -inf.
LOG_FLOOR = -1.0e4
# The student's tail 1 - sum(q_ids) is a difference of float32 sums: below ~1e-6 it is
# rounding noise, so it is clamped there (which also keeps its log and gradient finite).
TAIL_EPS = 1e-6


class LossSettingError(ValueError):
    """A loss setting out of range; ``setting`` is the :class:`LossSpec` field (or ``chunk_size``)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class LossSpec:
    """What the trainer asks of the loss: family, temperature, CE mix, JSD beta, cache kind."""

    kind: str = "fkl"  # forward KL: the classic KD objective and the only one valid for sampled caches
    temperature: float = 1.0  # 1 = distill the teacher's distribution as cached
    alpha: float = 0.0  # weight of hard-label CE; 0 = pure distillation (the cache carries the signal)
    beta: float = 0.5  # JSD mixture weight; 0.5 = the symmetric Jensen-Shannon divergence
    sampled: bool = False  # cache kind `sampled`: counts, no tail
    tail_bucket: bool = True  # False: renormalise the stored top-k and ignore the tail (what peers do)

    def validate(self) -> None:
        """Raise :class:`LossSettingError` for a setting outside its range or unsupported by the cache kind."""
        if self.kind not in LOSS_KINDS:
            raise LossSettingError("kind", f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {self.kind!r}")
        if not self.temperature > 0:
            raise LossSettingError("temperature", f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise LossSettingError("alpha", f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.beta < 1.0:
            raise LossSettingError("beta", f"JSD beta must be in (0, 1), got {self.beta}")
        if self.sampled and self.kind != "fkl":
            raise LossSettingError(
                "kind", f"loss {self.kind!r} is not supported for a `sampled` cache: only the forward KL has an "
                "unbiased estimator from teacher samples; use fkl or a `topk` cache")
        if self.sampled and self.temperature != 1.0:
            raise LossSettingError(
                "temperature", "temperature must be 1 for a `sampled` cache: the draws were taken from the teacher "
                "at temperature 1 and cannot be re-tempered; use a `topk` cache to distill at T != 1")


# ---------------------------------------------------------------------------------------------
# Buckets: every tensor below is [N, k + 1] (the k stored ids, then the tail bucket), with a
# `present` mask [N, k + 1] that drops padding entries and, when the teacher's stored tail is
# exactly 0 (e.g. k = V), the tail bucket of both sides (the student's tail there is rounding).


def student_buckets(lq_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The student's log-probs on the cached buckets.

    Args:
        lq_ids: ``[N, k]`` float32 student log-probs gathered at the cached ids.
        valid: ``[N, k]`` bool, false for padding entries.
    Returns:
        ``lq [N, k + 1]``: log q at the ids (``LOG_FLOOR`` where invalid), then
        ``log(1 - sum q_ids)`` clamped below at ``TAIL_EPS``.
    """
    lq_ids = lq_ids.masked_fill(~valid, LOG_FLOOR)
    # log1p(-exp(lse)) = log(1 - sum q_ids) without cancellation; the sum of k float32 terms
    # cannot resolve a tail below ~1e-6, so the lse is clamped there (also keeps log finite).
    lse = torch.logsumexp(lq_ids, dim=-1).clamp_max(math.log1p(-TAIL_EPS))
    return torch.cat([lq_ids, torch.log1p(-torch.exp(lse)).unsqueeze(-1)], dim=-1)


def teacher_buckets(t_logp: torch.Tensor, tail: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's bucket log-probs and the mask of present buckets.

    Args:
        t_logp: ``[N, k]`` teacher log-probs at the ids; ``tail``: ``[N]`` mass outside them;
        valid: ``[N, k]`` bool.
    Returns:
        ``lp [N, k + 1]`` (``LOG_FLOOR`` for empty buckets) and ``present [N, k + 1]`` bool.
    """
    tail = tail.float()
    present = torch.cat([valid, (tail > 0).unsqueeze(-1)], dim=-1)
    lp = torch.cat([t_logp.float(), torch.log(tail.clamp_min(1e-30)).unsqueeze(-1)], dim=-1)
    return lp.clamp_min(LOG_FLOOR).masked_fill(~present, LOG_FLOOR), present


def temper(lb: torch.Tensor, present: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Bucket tempering ``log_softmax(log b / T)`` over the present buckets: ``[N, k + 1]`` → same."""
    if temperature == 1.0:
        return lb
    if present is None:
        return torch.log_softmax(lb / temperature, dim=-1)
    out = torch.log_softmax((lb / temperature).masked_fill(~present, -math.inf), dim=-1)
    return out.masked_fill(~present, LOG_FLOOR)


# ---------------------------------------------------------------------------------------------
# Divergences over k + 1 buckets: teacher lp [N, k + 1], student lq [N, k + 1] and the
# present mask [N, k + 1] → per-position loss [N]. Empty buckets contribute exactly 0.
# present=None: every bucket is present (dense k = V targets), which saves a [N, V] copy per mask.


def _present_only(terms: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    return terms if present is None else torch.where(present, terms, 0.0)


def forward_kl(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """``KL(p || q) = sum_b p_b (log p_b - log q_b)`` → ``[N]``."""
    return _present_only(lp.exp() * (lp - lq), present).sum(-1)


def reverse_kl(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """``KL(q || p) = sum_b q_b (log q_b - log p_b)`` → ``[N]``."""
    return _present_only(lq.exp() * (lq - lp), present).sum(-1)


def jsd(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor | None, beta: float = 0.5) -> torch.Tensor:
    """``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q`` → ``[N]``."""
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    terms = beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm)
    return _present_only(terms, present).sum(-1)


def tvd(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Total variation ``0.5 sum_b |p_b - q_b|`` → ``[N]``."""
    return 0.5 * _present_only((lp.exp() - lq.exp()).abs(), present).sum(-1)


def sampled_kl(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Sampled-cache estimator ``sum_j (c_j/N) (log(c_j/N) - log q_j)`` → ``[N]``.

    ``lp`` holds ``log(count / num_draws)`` at the drawn ids; a sampled cache has no tail,
    so the tail bucket is absent and this is :func:`forward_kl` over the drawn ids.
    """
    return forward_kl(lp, lq, present)


def hard_ce(lq_label: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the next token: ``lq_label [N]`` (student log-prob of the label), ``labels [N]``
    (-100 = none, giving 0) → ``[N]``."""
    return -lq_label * (labels >= 0)


def class_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))`` over classes: ``[B, C]``, ``[B, C]`` → ``[B]``."""
    lp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    lq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1) * temperature**2


# ---------------------------------------------------------------------------------------------
# Per-position loss: the divergence over the buckets, mixed with hard-label CE


class PositionLoss(NamedTuple):
    """Per-position losses, each ``[N]``."""

    loss: torch.Tensor  # (1 - alpha) kd + alpha ce: what is minimised
    kd: torch.Tensor  # T^2 D(p_T || q_T), the distillation part
    ce: torch.Tensor  # hard-label cross-entropy at T = 1 (0 where there is no label), even when alpha = 0


def position_loss(student_logp: torch.Tensor, targets: KDTargets, spec: LossSpec) -> PositionLoss:
    """:func:`sparse_position_loss` from the full student log-softmax ``student_logp [N, V]``."""
    lq_label = student_logp.gather(1, targets.labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return sparse_position_loss(student_logp.gather(1, targets.ids), lq_label, targets, spec)


def renormalised_topk(t_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Teacher log-probs ``[N, k]`` renormalised over the valid stored ids (``tail_bucket=False``).

    With the tail then 0, the tail bucket is dropped from both sides and the loss compares the
    student's full-vocabulary log-probs at the k ids with the renormalised teacher top-k.
    """
    masked = t_logp.float().masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1, keepdim=True).clamp_min(-1e30)  # all-invalid rows stay finite
    return torch.where(valid, t_logp.float() - lse, t_logp.float())


def bucket_divergence(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor | None,
                      spec: LossSpec) -> torch.Tensor:
    """``T^2 D(p_T || q_T)`` of ``spec``'s family over the buckets: ``[N, k + 1]`` ×3 → ``[N]``."""
    if spec.sampled:
        return sampled_kl(lp, lq, present)
    lp, lq = temper(lp, present, spec.temperature), temper(lq, present, spec.temperature)
    if spec.kind == "jsd":
        kd = jsd(lp, lq, present, spec.beta)
    else:
        kd = {"fkl": forward_kl, "rkl": reverse_kl, "tvd": tvd}[spec.kind](lp, lq, present)
    return kd * spec.temperature**2


def sparse_position_loss(lq_ids: torch.Tensor, lq_label: torch.Tensor, targets: KDTargets,
                         spec: LossSpec) -> PositionLoss:
    """``(1 - alpha) T^2 D(p_T || q_T) + alpha CE`` per position, from gathered student log-probs.

    Args:
        lq_ids: ``[N, k]`` student log-softmax (temperature 1) at ``targets.ids``.
        lq_label: ``[N]`` student log-softmax at ``targets.labels`` (any value where there is none).
        targets: :class:`KDTargets` of the same ``N`` positions: teacher log-probs ``[N, k]`` at the ids,
            entry mask ``valid [N, k]``, tail mass ``[N]`` (0 for sampled caches), next-token labels ``[N]``.
    Returns:
        :class:`PositionLoss` of ``[N]`` tensors: the loss and its two parts (for logging).
    """
    t_logp, tail, valid = targets.logprobs, targets.tail, targets.valid
    if targets.dense and lq_ids.shape == t_logp.shape:
        # k = V in vocabulary order: the buckets are the tokens themselves, all present, no tail (and
        # renormalising changes nothing), so the [N, V + 1] bucket copies and masks are skipped.
        kd = bucket_divergence(t_logp, lq_ids, None, spec)
    else:
        if not spec.tail_bucket and not spec.sampled:
            t_logp, tail = renormalised_topk(t_logp, valid), torch.zeros_like(tail)
        lp, present = teacher_buckets(t_logp, tail, valid)
        kd = bucket_divergence(lp, student_buckets(lq_ids, valid), present, spec)
    ce = hard_ce(lq_label, targets.labels)
    loss = kd if spec.alpha == 0 else (1 - spec.alpha) * kd + spec.alpha * ce
    return PositionLoss(loss, kd, ce)


# ---------------------------------------------------------------------------------------------
# Output head: logits from hidden states, including model-specific output scaling


@dataclass(frozen=True)
class HeadSpec:
    """How a model turns its last hidden state into logits (beyond ``h @ W.T + b``)."""

    logit_scale: float = 1.0  # Cohere-style multiplier; 1 = none
    softcap: float | None = None  # Gemma-2-style final_logit_softcapping; None = none


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, head: HeadSpec) -> torch.Tensor:
    """Float32 logits ``[n, V]`` from ``hidden [n, H]``, ``weight [V, H]``, ``bias [V] | None``."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):  # bf16 autocast must not downcast
        return scale_logits(F.linear(hidden.float(), weight.float(), None if bias is None else bias.float()), head)


def scale_logits(logits: torch.Tensor, head: HeadSpec) -> torch.Tensor:
    """The model's output scaling (``head``) applied to raw head outputs ``h @ W.T + b``."""
    if head.logit_scale != 1.0:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


# ---------------------------------------------------------------------------------------------
# Targets: what a teacher (the cache, or a model in memory) hands to the loss


@dataclass(frozen=True)
class KDTargets:
    """Sparse targets at ``N`` gathered positions: ``k`` entries (token id, teacher log-prob) each."""

    ids: torch.Tensor  # [N, k] int64
    logprobs: torch.Tensor  # [N, k] float32
    tail: torch.Tensor  # [N] float32
    valid: torch.Tensor  # [N, k] bool
    labels: torch.Tensor  # [N] int64, -100 = none
    # True: k = V and ids[:, j] = j, every entry valid, tail 0, log-probs >= LOG_FLOOR (the teacher's whole
    # distribution, from full_distribution); the loss then works on the [N, V] tensors directly.
    dense: bool = False

    @property
    def num_positions(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, positions: slice) -> KDTargets:
        """The targets of a slice of the positions (a chunk)."""
        return KDTargets(ids=self.ids[positions], logprobs=self.logprobs[positions], tail=self.tail[positions],
                         valid=self.valid[positions], labels=self.labels[positions], dense=self.dense)

    @classmethod
    def full_distribution(cls, teacher_logits: torch.Tensor, labels: torch.Tensor) -> KDTargets:
        """The teacher's whole distribution as targets (``k = V``, tail 0): the loss is then the exact
        full-vocabulary divergence. ``teacher_logits [N, V]``, ``labels [N]``; ids and valid are
        broadcast views, so only the ``[N, V]`` log-probs take memory."""
        n, vocab = teacher_logits.shape
        ids = torch.arange(vocab, device=teacher_logits.device).expand(n, vocab)
        # floored in place like the buckets' (a -inf logit has p = 0, not NaN), as the dense loss path expects
        logprobs = torch.log_softmax(teacher_logits.float(), dim=-1).clamp_min_(LOG_FLOOR)
        return cls(ids=ids, logprobs=logprobs,
                   tail=teacher_logits.new_zeros(n, dtype=torch.float32),
                   valid=torch.ones((1, 1), dtype=torch.bool, device=teacher_logits.device).expand(n, vocab),
                   labels=labels, dense=True)


class PositionTargets(Protocol):
    """What :class:`~pipeline.train.kd_loss.SparseKDLoss` reads: a count, and the :class:`KDTargets` of
    a chunk of positions. :class:`KDTargets` is one; a lazy one (the online teacher's, which computes
    each chunk's distribution only when the loss asks for it) is another."""

    @property
    def num_positions(self) -> int: ...

    def __getitem__(self, positions: slice) -> KDTargets: ...


@dataclass(frozen=True)
class ClassTargets:
    """Targets of a classification batch: the teacher's class logits ``[B, C]`` and labels ``[B]`` (-100 = none)."""

    logits: torch.Tensor
    labels: torch.Tensor

    @property
    def num_positions(self) -> int:
        return int(self.logits.shape[0])


def full_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: KDTargets,
    spec: LossSpec,
    head: HeadSpec = HeadSpec(),
) -> torch.Tensor:
    """Reference (unchunked) loss sum: materialises ``[N, V]`` float32 logits. Returns a scalar."""
    logp = torch.log_softmax(head_logits(hidden, weight, bias, head), dim=-1)
    return position_loss(logp, targets, spec).loss.sum()
