"""The KD losses as modules: :class:`SparseKDLoss` (token-level, chunked) and :class:`ClassKDLoss`.

``SparseKDLoss(spec, chunk_size, head_spec)(hidden, head, targets) -> KDLossOutput`` goes from
the student's last hidden state at the target positions ``hidden [N, H]``, through its output
head (``head.weight [V, H]``, optional ``head.bias [V]``), to the loss against
:class:`~pipeline.train.losses.KDTargets` — compare Liger-Kernel's ``chunked_loss`` modules.
The per-position math is the pure functions of :mod:`pipeline.train.losses`.

**Chunking.** Positions are processed in chunks of ``chunk_size``. Each chunk's gradient with
respect to its logits is formed analytically in the chunk's single ``[chunk, V]`` float32 buffer
and immediately turned into gradients for the hidden states and the head weight, so no
``[N, V]`` tensor exists in forward or backward. Chunks return sums; the total is divided
once, by ``normalizer``: the caller's global count of target positions (over micro-batches
and ranks), or by default this call's own count, each at least 1.

**Targets per chunk.** The loss asks for ``targets[chunk]`` only when it computes that chunk
(:class:`~pipeline.train.losses.PositionTargets`), so a lazy teacher — the online teacher's
head applied to its hidden states — also holds one chunk's ``[chunk, V]`` distribution at a
time. Targets with ``dense`` set (``k = V`` in vocabulary order) skip the gather and scatter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pipeline.train.losses import (
    ClassTargets,
    HeadSpec,
    KDTargets,
    LossSettingError,
    LossSpec,
    PositionTargets,
    class_kl,
    hard_ce,
    head_logits,
    sparse_position_loss,
)


class KDLossOutput(NamedTuple):
    """Sums over the call's target positions, each divided once by the normalizer (see module doc)."""

    loss: torch.Tensor  # 0-d float32, the only differentiable field: (1 - alpha) kd + alpha ce
    kd_loss: torch.Tensor  # 0-d, the distillation part T^2 D(p_T || q_T)
    ce_loss: torch.Tensor  # 0-d, hard-label cross-entropy at T = 1 (reported even when alpha = 0)
    top1_agreement: torch.Tensor | None  # 0-d, positions where the student's argmax is the teacher's top id
    n_targets: int  # target positions in this call (before normalisation)


def _normalised(sums: tuple[torch.Tensor, ...], agreement: bool, n_targets: int,
                normalizer: float | None) -> KDLossOutput:
    """``sums = (loss, kd, ce, agree)`` divided by ``max(normalizer or n_targets, 1)``."""
    denom = max(float(n_targets if normalizer is None else normalizer), 1.0)
    loss, kd, ce, agree = (s / denom for s in sums)
    return KDLossOutput(loss, kd.detach(), ce.detach(), agree.detach() if agreement else None, n_targets)


class _ChunkSums(NamedTuple):
    """One chunk's results: 0-d sums, and ``dL/dlogits [c, V]`` (None without grad)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    agree: torch.Tensor
    grad_logits: torch.Tensor | None


def _chunk_loss(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: KDTargets, spec: LossSpec, head: HeadSpec,
    need_grad: bool, agreement: bool,
) -> _ChunkSums:
    """Sums and ``dL/dlogits`` of one chunk: ``h [c, H]``, ``w [V, H]``, ``b [V] | None``, ``t`` of ``c`` positions.

    Holds one ``[c, V]`` float32 buffer, reused in place: logits → exp(logits - max) → dL/dlogits. The
    loss depends on log q only through the gathered ``lq_ids [c, k]`` and ``lq_label [c]``, so
    with ``S = dL/dlog q`` (sparse: g at the ids and labels), ``dL/dz = S - softmax(z) * rowsum(S)``.
    """
    z = head_logits(h, w, b, head)  # [c, V]
    agree = z.new_zeros(())
    if agreement:
        teacher_top = t.ids.gather(1, t.logprobs.argmax(-1, keepdim=True)).squeeze(-1)
        agree = (z.argmax(-1) == teacher_top).sum().float()
    deriv = None  # d logits / d raw logits, for scaled or soft-capped heads
    if need_grad and head.softcap is not None:
        deriv = (1 - (z / head.softcap) ** 2) * head.logit_scale
    label_idx = t.labels.clamp_min(0).unsqueeze(-1)
    dense = t.dense and t.ids.shape[1] == z.shape[1]  # the ids are 0..V-1: no gather, no scatter
    z_ids = z.clone() if dense else z.gather(1, t.ids)
    z_label = z.gather(1, label_idx).squeeze(-1)
    # softmax in place with the fewest passes over [c, V]: max, exp(z - max), sum
    zmax = z.amax(dim=-1, keepdim=True)
    z.sub_(zmax).exp_()
    denom = z.sum(dim=-1, keepdim=True)
    lse = zmax + denom.log()  # [c, 1]
    lq_ids = z_ids.sub_(lse).requires_grad_(need_grad)
    lq_label = (z_label - lse.squeeze(-1)).requires_grad_(need_grad)
    with torch.enable_grad():
        per_position = sparse_position_loss(lq_ids, lq_label, t, spec)
        total = per_position.loss.sum()
    kd, ce = per_position.kd.detach().sum(), per_position.ce.detach().sum()
    if not need_grad:
        return _ChunkSums(total.detach(), kd, ce, agree, None)
    g_ids, g_label = torch.autograd.grad(total, [lq_ids, lq_label], allow_unused=True, materialize_grads=True)
    z.mul_(-(g_ids.sum(-1) + g_label).unsqueeze(-1) / denom)  # -softmax(z) * rowsum(S)
    (z.add_(g_ids) if dense else z.scatter_add_(1, t.ids, g_ids)).scatter_add_(1, label_idx, g_label.unsqueeze(-1))
    if deriv is not None:
        z.mul_(deriv)
    elif head.logit_scale != 1.0:
        z.mul_(head.logit_scale)
    return _ChunkSums(total.detach(), kd, ce, agree, z)


class _ChunkedKD(torch.autograd.Function):
    """Sums (loss, kd, ce, top-1 agreement) over chunks of positions; gradients computed per chunk
    inside forward (Liger style).

    Only one chunk's ``[chunk, V]`` float32 buffer exists at a time, in forward and in backward:
    backward only scales the stored ``[N, H]`` and ``[V, H]`` gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec, head, chunk_size, agreement):  # type: ignore[override]
        need_grad = any(ctx.needs_input_grad[:3])
        grad_h = torch.zeros_like(hidden) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if (need_grad and bias is not None) else None
        sums = torch.zeros(4, device=hidden.device, dtype=torch.float32)  # loss, kd, ce, agree
        w32 = weight.detach().float()
        b32 = None if bias is None else bias.detach().float()
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h = hidden[sl].detach().float()
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                chunk = _chunk_loss(h, w32, b32, targets[sl], spec, head, need_grad, agreement)
                dz = chunk.grad_logits
                if dz is not None:
                    grad_h[sl] = (dz @ w32).to(hidden.dtype)
                    grad_w.addmm_(dz.T, h)
                    if grad_b is not None:
                        grad_b += dz.sum(0)
            sums += torch.stack([chunk.loss, chunk.kd, chunk.ce, chunk.agree])
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        loss, kd, ce, agree = (s.clone() for s in sums.unbind())  # separate tensors, not views of one
        ctx.mark_non_differentiable(kd, ce, agree)
        return loss, kd, ce, agree

    @staticmethod
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_loss
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        gb = None if grad_b is None else (grad_b * grad_loss).to(ctx.weight_dtype)
        return gh, gw, gb, None, None, None, None, None


class SparseKDLoss(torch.nn.Module):
    """Sparse KD loss from hidden states through the output head, chunked over positions.

    Args:
        spec: the loss family and its settings (validated here).
        chunk_size: positions per chunk; peak extra memory is a few ``[chunk_size, V]`` float32.
        head_spec: the model's output scaling (logit scale, soft cap) after ``h @ W.T + b``.
    Raises:
        LossSettingError: a ``ValueError`` naming the setting that is out of range.
    """

    def __init__(self, spec: LossSpec, chunk_size: int = 1024, head_spec: HeadSpec = HeadSpec()) -> None:
        super().__init__()
        spec.validate()
        if chunk_size < 1:
            raise LossSettingError("chunk_size", f"chunk_size must be >= 1, got {chunk_size}")
        self.spec = spec
        self.chunk_size = chunk_size
        self.head_spec = head_spec

    def forward(self, hidden: torch.Tensor, head: torch.nn.Module, targets: PositionTargets, *,
                normalizer: float | None = None, agreement: bool = False) -> KDLossOutput:
        """Loss of ``hidden [N, H]`` through ``head`` against ``targets`` at the same ``N`` positions.

        Args:
            head: the output head, e.g. ``model.get_output_embeddings()``: ``weight [V, H]``, ``bias [V]`` or none.
            normalizer: the count the sums are divided by (at least 1); default ``N``. The trainer passes the
                global count of its optimizer step; pass 1 for plain sums.
            agreement: also count the positions whose student argmax is the teacher's top id (one more pass
                over the logits, so only asked for in evaluation).
        """
        if hidden.shape[0] != targets.num_positions:
            raise ValueError(f"hidden states hold {hidden.shape[0]} positions but the targets "
                             f"{targets.num_positions}; give both at the same target positions")
        sums = _ChunkedKD.apply(hidden, head.weight, getattr(head, "bias", None), targets, self.spec,
                                self.head_spec, self.chunk_size, agreement)
        return _normalised(sums, agreement, targets.num_positions, normalizer)


class ClassKDLoss(torch.nn.Module):
    """``T^2 KL(teacher || student)`` over classes, mixed with hard-label CE: ``(logits [B, C], ClassTargets)``.

    The class loss is the forward KL whatever ``spec.kind`` says (a class distribution is small and
    complete, so nothing is gained from the other families).
    """

    def __init__(self, spec: LossSpec) -> None:
        super().__init__()
        spec.validate()
        self.spec = spec

    def forward(self, student_logits: torch.Tensor, targets: ClassTargets, *, normalizer: float | None = None,
                agreement: bool = True) -> KDLossOutput:
        spec = self.spec
        kd = class_kl(targets.logits, student_logits, spec.temperature)
        lq = torch.log_softmax(student_logits.float(), -1)
        ce = hard_ce(lq.gather(1, targets.labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), targets.labels)
        loss = kd if spec.alpha == 0 else (1 - spec.alpha) * kd + spec.alpha * ce
        agree = (student_logits.argmax(-1) == targets.logits.argmax(-1)).sum().float()
        return _normalised((loss.sum(), kd.sum(), ce.sum(), agree), agreement, targets.num_positions, normalizer)
