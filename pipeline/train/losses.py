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

**Chunking.** :func:`chunked_kd_loss` goes from the last hidden state at the target positions
to the loss sum in chunks of positions. Each chunk's gradient with respect to its logits is
formed analytically in the chunk's single ``[chunk, V]`` float32 buffer and immediately turned
into gradients for the hidden states and the head weight, so no ``[N, V]`` tensor exists in
forward or backward. Callers divide the sum once by the global count of target positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError

LOSS_KINDS = ("fkl", "rkl", "jsd", "tvd")
# A floor for log-probabilities of empty buckets: exp(-1e4) is exactly 0 in float32, so
# 0 * (finite) terms vanish instead of turning into NaN through 0 * -inf.
LOG_FLOOR = -1.0e4
# The student's tail 1 - sum(q_ids) is a difference of float32 sums: below ~1e-6 it is
# rounding noise, so it is clamped there (which also keeps its log and gradient finite).
TAIL_EPS = 1e-6


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
        if self.kind not in LOSS_KINDS:
            raise ConfigError(f"loss (flag --loss) must be one of {', '.join(LOSS_KINDS)}, got {self.kind!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature (flag --temperature) must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha (flag --alpha) must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"beta (flag --jsd-beta) must be in (0, 1), got {self.beta}")
        if self.sampled and self.kind != "fkl":
            raise ConfigError(
                f"loss {self.kind!r} is not supported for a `sampled` cache: only the forward KL has an "
                "unbiased estimator from teacher samples; use --loss fkl or a `topk` cache"
            )
        if self.sampled and self.temperature != 1.0:
            raise ConfigError(
                "temperature (flag --temperature) must be 1 for a `sampled` cache: the draws were taken from "
                "the teacher at temperature 1 and cannot be re-tempered; use a `topk` cache to distill at T != 1"
            )


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


def temper(lb: torch.Tensor, present: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bucket tempering ``log_softmax(log b / T)`` over the present buckets: ``[N, k + 1]`` → same."""
    if temperature == 1.0:
        return lb
    out = torch.log_softmax((lb / temperature).masked_fill(~present, -math.inf), dim=-1)
    return out.masked_fill(~present, LOG_FLOOR)


# ---------------------------------------------------------------------------------------------
# Divergences over k + 1 buckets: teacher lp [N, k + 1], student lq [N, k + 1] and the
# present mask [N, k + 1] → per-position loss [N]. Empty buckets contribute exactly 0.


def forward_kl(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_b p_b (log p_b - log q_b)`` → ``[N]``."""
    return torch.where(present, lp.exp() * (lp - lq), 0.0).sum(-1)


def reverse_kl(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``KL(q || p) = sum_b q_b (log q_b - log p_b)`` → ``[N]``."""
    return torch.where(present, lq.exp() * (lq - lp), 0.0).sum(-1)


def jsd(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q`` → ``[N]``."""
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    terms = beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm)
    return torch.where(present, terms, 0.0).sum(-1)


def tvd(lp: torch.Tensor, lq: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Total variation ``0.5 sum_b |p_b - q_b|`` → ``[N]``."""
    return 0.5 * torch.where(present, (lp.exp() - lq.exp()).abs(), 0.0).sum(-1)


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
# Per-position loss from full student log-probs


def position_loss(
    student_logp: torch.Tensor,
    ids: torch.Tensor,
    t_logp: torch.Tensor,
    tail: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_position_loss` from the full student log-softmax ``student_logp [N, V]``."""
    lq_label = student_logp.gather(1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return sparse_position_loss(student_logp.gather(1, ids), lq_label, t_logp, tail, valid, labels, spec)


def renormalised_topk(t_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Teacher log-probs ``[N, k]`` renormalised over the valid stored ids (``--no-tail-bucket``).

    With the tail then 0, the tail bucket is dropped from both sides and the loss compares the
    student's full-vocabulary log-probs at the k ids with the renormalised teacher top-k.
    """
    masked = t_logp.float().masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1, keepdim=True).clamp_min(-1e30)  # all-invalid rows stay finite
    return torch.where(valid, t_logp.float() - lse, t_logp.float())


def sparse_position_loss(
    lq_ids: torch.Tensor,
    lq_label: torch.Tensor,
    t_logp: torch.Tensor,
    tail: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 - alpha) T^2 D(p_T || q_T) + alpha CE`` per position, from gathered student log-probs.

    Args:
        lq_ids: ``[N, k]`` student log-softmax (temperature 1) at the cached ids.
        lq_label: ``[N]`` student log-softmax at the label (any value where there is none).
        t_logp, valid: ``[N, k]`` teacher log-probs, entry mask.
        tail: ``[N]`` teacher tail mass (0 for sampled caches).
        labels: ``[N]`` next token, -100 where there is none.
    Returns:
        ``loss [N]`` and the distillation part alone ``kd [N]`` (for logging).
    """
    if not spec.tail_bucket and not spec.sampled:
        t_logp, tail = renormalised_topk(t_logp, valid), torch.zeros_like(tail)
    lq = student_buckets(lq_ids, valid)
    lp, present = teacher_buckets(t_logp, tail, valid)
    if spec.sampled:
        kd = sampled_kl(lp, lq, present)
    else:
        lp, lq = temper(lp, present, spec.temperature), temper(lq, present, spec.temperature)
        if spec.kind == "jsd":
            kd = jsd(lp, lq, present, spec.beta)
        else:
            kd = {"fkl": forward_kl, "rkl": reverse_kl, "tvd": tvd}[spec.kind](lp, lq, present)
        kd = kd * spec.temperature**2
    loss = kd if spec.alpha == 0 else (1 - spec.alpha) * kd + spec.alpha * hard_ce(lq_label, labels)
    return loss, kd


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
        return _scaled(F.linear(hidden.float(), weight.float(), None if bias is None else bias.float()), head)


def _scaled(logits: torch.Tensor, head: HeadSpec) -> torch.Tensor:
    if head.logit_scale != 1.0:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


@dataclass
class KDTargets:
    """Sparse targets at ``N`` gathered positions (see :func:`position_loss` for shapes)."""

    ids: torch.Tensor  # [N, k] int64
    logprobs: torch.Tensor  # [N, k] float32
    tail: torch.Tensor  # [N] float32
    valid: torch.Tensor  # [N, k] bool
    labels: torch.Tensor  # [N] int64, -100 = none


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
    t = targets
    return position_loss(logp, t.ids, t.logprobs, t.tail, t.valid, t.labels, spec)[0].sum()


def _chunk_loss(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: KDTargets, spec: LossSpec, head: HeadSpec,
    need_grad: bool, agreement: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss sum, kd sum, ``dL/dlogits [c, V]`` (None without grad) and top-1 agreement of one chunk.

    Holds one ``[c, V]`` float32 buffer, reused in place: logits → exp(logits - max) → dL/dlogits. The
    loss depends on log q only through the gathered ``lq_ids [c, k]`` and ``lq_label [c]``, so
    with ``S = dL/dlog q`` (sparse: g at the ids and labels), ``dL/dz = S - softmax(z) * rowsum(S)``.
    """
    z = head_logits(h, w, b, head)  # [c, V]
    agree = None
    if agreement:
        teacher_top = t.ids.gather(1, t.logprobs.argmax(-1, keepdim=True)).squeeze(-1)
        agree = (z.argmax(-1) == teacher_top).sum().float()
    deriv = None  # d logits / d raw logits, for scaled or soft-capped heads
    if need_grad and head.softcap is not None:
        deriv = (1 - (z / head.softcap) ** 2) * head.logit_scale
    label_idx = t.labels.clamp_min(0).unsqueeze(-1)
    z_ids, z_label = z.gather(1, t.ids), z.gather(1, label_idx).squeeze(-1)
    # softmax in place with the fewest passes over [c, V]: max, exp(z - max), sum
    zmax = z.amax(dim=-1, keepdim=True)
    z.sub_(zmax).exp_()
    denom = z.sum(dim=-1, keepdim=True)
    lse = zmax + denom.log()  # [c, 1]
    lq_ids = (z_ids - lse).requires_grad_(need_grad)
    lq_label = (z_label - lse.squeeze(-1)).requires_grad_(need_grad)
    with torch.enable_grad():
        loss, kd = sparse_position_loss(lq_ids, lq_label, t.logprobs, t.tail, t.valid, t.labels, spec)
        total = loss.sum()
    if not need_grad:
        return total.detach(), kd.detach().sum(), None, agree
    g_ids, g_label = torch.autograd.grad(total, [lq_ids, lq_label], allow_unused=True, materialize_grads=True)
    z.mul_(-(g_ids.sum(-1) + g_label).unsqueeze(-1) / denom)  # -softmax(z) * rowsum(S)
    z.scatter_add_(1, t.ids, g_ids).scatter_add_(1, label_idx, g_label.unsqueeze(-1))
    if deriv is not None:
        z.mul_(deriv)
    elif head.logit_scale != 1.0:
        z.mul_(head.logit_scale)
    return total.detach(), kd.detach().sum(), z, agree


class _ChunkedKD(torch.autograd.Function):
    """Loss sum over chunks of positions; gradients computed per chunk inside forward (Liger style).

    Only one chunk's ``[chunk, V]`` float32 buffer exists at a time, in forward and in backward:
    backward only scales the stored ``[N, H]`` and ``[V, H]`` gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec, head, chunk_size, stats):  # type: ignore[override]
        need_grad = any(ctx.needs_input_grad[:3])
        agreement = stats is not None and "top1_agree" in stats
        grad_h = torch.zeros_like(hidden) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if (need_grad and bias is not None) else None
        total = hidden.new_zeros((), dtype=torch.float32)
        kd_total = hidden.new_zeros((), dtype=torch.float32)
        agree = hidden.new_zeros((), dtype=torch.float32)
        w32 = weight.detach().float()
        b32 = None if bias is None else bias.detach().float()
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h = hidden[sl].detach().float()
            t = KDTargets(ids=targets.ids[sl], logprobs=targets.logprobs[sl], tail=targets.tail[sl],
                          valid=targets.valid[sl], labels=targets.labels[sl])
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                loss, kd, dz, top1 = _chunk_loss(h, w32, b32, t, spec, head, need_grad, agreement)
                if dz is not None:
                    grad_h[sl] = (dz @ w32).to(hidden.dtype)
                    grad_w.addmm_(dz.T, h)
                    if grad_b is not None:
                        grad_b += dz.sum(0)
            total += loss
            kd_total += kd
            if top1 is not None:
                agree += top1
        if stats is not None:
            stats["kd_sum"] = kd_total
            if agreement:
                stats["top1_agree"] = agree
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        gb = None if grad_b is None else (grad_b * grad_out).to(ctx.weight_dtype)
        return gh, gw, gb, None, None, None, None, None


def chunked_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: KDTargets,
    spec: LossSpec,
    head: HeadSpec = HeadSpec(),
    chunk_size: int = 1024,
    stats: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sum over positions of :func:`position_loss`, from hidden states, without ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` the student's last hidden state at the target positions.
        weight: ``[V, H]`` output head weight; ``bias``: ``[V]`` or None.
        targets: :class:`KDTargets` for the same ``N`` positions.
        chunk_size: positions per chunk; peak extra memory is a few ``[chunk_size, V]`` float32.
        stats: if given, receives ``kd_sum`` (distillation part, 0-d); if it already holds the key
            ``top1_agree``, that is set to the count of positions where the student's argmax is the
            teacher's top id (one more pass over the logits, so only asked for in evaluation).
    Returns:
        A 0-d float32 sum (divide by the global number of target positions once, outside).
    """
    if chunk_size < 1:
        raise ConfigError(f"loss_chunk_size (flag --loss-chunk-size) must be >= 1, got {chunk_size}")
    return _ChunkedKD.apply(hidden, weight, bias, targets, spec, head, chunk_size, stats)
