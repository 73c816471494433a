"""Sparse KD losses: k = V equals the full divergence, the chunked module (SparseKDLoss) equals
the unchunked reference (values and gradients), empty batches give 0, temperature and the
sampled estimator behave as documented. Every loss family runs through the same tests."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.train.kd_loss import ClassKDLoss, SparseKDLoss
from pipeline.train.losses import (
    LOSS_KINDS,
    ClassTargets,
    HeadSpec,
    KDTargets,
    LossSettingError,
    LossSpec,
    class_kl,
    full_kd_loss,
    position_loss,
    student_buckets,
    teacher_buckets,
    temper,
)

torch.set_default_dtype(torch.float32)


def topk_targets(teacher_logits: torch.Tensor, k: int, seed: int = 0) -> KDTargets:
    """Exact top-k + tail targets of ``teacher_logits [N, V]``, with random next-token labels."""
    logp = torch.log_softmax(teacher_logits.double(), dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    tail = (1 - vals.exp().sum(-1)).clamp_min(0)
    if k == teacher_logits.shape[1]:
        tail = torch.zeros_like(tail)  # the dump stores exactly 0 when the ids cover the vocabulary
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, teacher_logits.shape[1], (teacher_logits.shape[0],), generator=gen)
    labels[::5] = -100
    return KDTargets(ids=ids, logprobs=vals.float(), tail=tail.float(),
                     valid=torch.ones_like(ids, dtype=torch.bool), labels=labels)


def full_divergence(kind: str, t_logits: torch.Tensor, s_logits: torch.Tensor, T: float, beta: float = 0.5):
    """Independent full-vocabulary reference, [N]."""
    lp = torch.log_softmax(t_logits.double() / T, -1)
    lq = torch.log_softmax(s_logits.double() / T, -1)
    p, q = lp.exp(), lq.exp()
    if kind == "fkl":
        d = (p * (lp - lq)).sum(-1)
    elif kind == "rkl":
        d = (q * (lq - lp)).sum(-1)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * (p * (lp - m.log())).sum(-1) + (1 - beta) * (q * (lq - m.log())).sum(-1)
    else:
        d = 0.5 * (p - q).abs().sum(-1)
    return d * T**2


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
def test_k_equal_vocab_matches_full_divergence(kind: str, T: float) -> None:
    torch.manual_seed(0)
    N, V = 13, 29
    t_logits, s_logits = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    tg = topk_targets(t_logits, k=V)
    spec = LossSpec(kind=kind, temperature=T)
    loss, kd, _ = position_loss(torch.log_softmax(s_logits, -1), tg, spec)
    ref = full_divergence(kind, t_logits, s_logits, T).float()
    torch.testing.assert_close(kd, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(loss, kd)  # alpha = 0: no CE


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_identical_distributions_give_zero(kind: str) -> None:
    torch.manual_seed(1)
    logits = torch.randn(7, 40)
    tg = topk_targets(logits, k=6)
    kd = position_loss(torch.log_softmax(logits, -1), tg, LossSpec(kind=kind, temperature=1.5)).kd
    torch.testing.assert_close(kd, torch.zeros(7), atol=1e-6, rtol=0)


def _inputs(N: int, H: int, V: int, k: int, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, requires_grad=True)
    weight = (torch.randn(V, H, generator=gen) / math.sqrt(H)).requires_grad_(True)
    b = (torch.randn(V, generator=gen) * 0.1).requires_grad_(True) if bias else None
    tg = topk_targets(torch.randn(N, V, generator=gen) * 2, k=k, seed=seed)
    return hidden, weight, b, tg


def _head(weight: torch.Tensor, bias: torch.Tensor | None) -> SimpleNamespace:
    """An output head holding the given leaf tensors (so the test reads their ``.grad``)."""
    return SimpleNamespace(weight=weight, bias=bias)


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize(("N", "chunk", "bias", "T", "alpha"), [(37, 8, False, 1.0, 0.0), (23, 5, True, 2.0, 0.3),
                                                               (9, 64, False, 0.5, 1.0)])
def test_chunked_equals_unchunked_values_and_gradients(kind, N, chunk, bias, T, alpha) -> None:
    H, V, k = 19, 53, 7
    spec = LossSpec(kind=kind, temperature=T, alpha=alpha)
    head = HeadSpec(logit_scale=0.9, softcap=15.0)
    h1, w1, b1, tg = _inputs(N, H, V, k, bias)
    ref = full_kd_loss(h1, w1, b1, tg, spec, head)
    ref.backward()
    h2, w2, b2, _ = _inputs(N, H, V, k, bias)
    out = SparseKDLoss(spec, chunk_size=chunk, head_spec=head)(h2, _head(w2, b2), tg, normalizer=1.0, agreement=True)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-6, rtol=1e-4)
    if bias:
        torch.testing.assert_close(b2.grad, b1.grad, atol=1e-6, rtol=1e-4)
    assert 0 <= float(out.top1_agreement) <= N and out.n_targets == N
    torch.testing.assert_close(out.loss.detach(), (1 - alpha) * out.kd_loss + alpha * out.ce_loss, atol=1e-5, rtol=1e-5)


def test_loss_output_parts_and_normalizer() -> None:
    """Sums are divided once: by default by the call's positions, else by the caller's (global) count."""
    h, w, b, tg = _inputs(12, 9, 31, 5, bias=True)
    loss = SparseKDLoss(LossSpec(alpha=0.5), chunk_size=5)
    with torch.no_grad():
        sums = loss(h, _head(w, b), tg, normalizer=1.0)
        mean = loss(h, _head(w, b), tg)
        global_mean = loss(h, _head(w, b), tg, normalizer=48)
    assert mean.top1_agreement is None and mean.n_targets == 12
    for field in ("loss", "kd_loss", "ce_loss"):
        torch.testing.assert_close(getattr(mean, field), getattr(sums, field) / 12)
        torch.testing.assert_close(getattr(global_mean, field), getattr(sums, field) / 48)
    logp = torch.log_softmax(h @ w.T + b, -1)
    has = tg.labels >= 0
    torch.testing.assert_close(sums.ce_loss, -logp[has].gather(1, tg.labels[has, None]).sum(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        loss(h[:3], _head(w, b), tg)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_all_masked_batch_gives_zero_without_nan(kind: str) -> None:
    h, w, b, tg = _inputs(0, 8, 11, 3, bias=True)
    out = SparseKDLoss(LossSpec(kind=kind, alpha=0.5))(h, _head(w, b), tg)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and out.n_targets == 0
    for g in (h.grad, w.grad, b.grad):
        assert g is not None and torch.isfinite(g).all() and float(g.abs().sum()) == 0.0


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_padding_entries_are_ignored(kind: str) -> None:
    torch.manual_seed(3)
    logits_t, logits_s = torch.randn(5, 30), torch.randn(5, 30)
    tg = topk_targets(logits_t, k=4)
    padded = KDTargets(ids=torch.cat([tg.ids, torch.zeros(5, 3, dtype=torch.long)], 1),
                       logprobs=torch.cat([tg.logprobs, torch.full((5, 3), -math.inf)], 1),
                       tail=tg.tail, valid=torch.cat([tg.valid, torch.zeros(5, 3, dtype=torch.bool)], 1),
                       labels=tg.labels)
    lq = torch.log_softmax(logits_s, -1)
    spec = LossSpec(kind=kind, temperature=1.3)
    a = position_loss(lq, tg, spec)[0]
    b = position_loss(lq, padded, spec)[0]
    torch.testing.assert_close(a, b)


def test_buckets_carry_the_tail_mass() -> None:
    torch.manual_seed(4)
    logits = torch.randn(6, 50)
    tg = topk_targets(logits, k=5)
    lq = student_buckets(torch.log_softmax(logits, -1).gather(1, tg.ids), tg.valid)
    torch.testing.assert_close(lq.exp().sum(-1), torch.ones(6))
    lp, present = teacher_buckets(tg.logprobs, tg.tail, tg.valid)
    assert present.all()
    torch.testing.assert_close(lp, lq, atol=1e-5, rtol=1e-5)


def test_temperature_is_bucket_tempering() -> None:
    """T acts on the k + 1 buckets: p_b^(1/T) renormalised; T = 1 is the identity."""
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))  # two ids and the tail
    present = torch.ones(1, 3, dtype=torch.bool)
    expected = torch.tensor([[0.5, 0.3, 0.2]]) ** 0.5
    expected = expected / expected.sum()
    torch.testing.assert_close(temper(lp, present, 2.0).exp(), expected)
    torch.testing.assert_close(temper(lp, present, 1.0), lp)
    # An empty tail bucket stays empty and does not take mass.
    present[0, 2] = False
    torch.testing.assert_close(temper(lp, present, 2.0).exp()[0, :2].sum(), torch.tensor(1.0))


def test_temperature_scales_loss_by_T_squared_for_small_differences() -> None:
    """With k = V the loss is T^2 KL(softmax(t/T) || softmax(s/T)), as in Hinton et al."""
    torch.manual_seed(5)
    t, s = torch.randn(4, 12), torch.randn(4, 12)
    tg = topk_targets(t, k=12)
    kd = position_loss(torch.log_softmax(s, -1), tg, LossSpec(temperature=4.0)).kd
    lp, lq = torch.log_softmax(t / 4, -1), torch.log_softmax(s / 4, -1)
    torch.testing.assert_close(kd, 16 * (lp.exp() * (lp - lq)).sum(-1), atol=1e-5, rtol=1e-5)


def test_alpha_mixes_hard_label_cross_entropy() -> None:
    torch.manual_seed(6)
    t, s = torch.randn(8, 20), torch.randn(8, 20)
    tg = topk_targets(t, k=4)
    lq = torch.log_softmax(s, -1)
    args = (lq, tg)
    kd = position_loss(*args, LossSpec(alpha=0.0))[0]
    ce = position_loss(*args, LossSpec(alpha=1.0))[0]
    mix = position_loss(*args, LossSpec(alpha=0.25))[0]
    torch.testing.assert_close(mix, 0.75 * kd + 0.25 * ce)
    has = tg.labels >= 0
    torch.testing.assert_close(ce[has], -lq[has].gather(1, tg.labels[has, None]).squeeze(1))
    assert (ce[~has] == 0).all()


def _sampled_targets(p: torch.Tensor, num_draws: int, gen: torch.Generator) -> KDTargets:
    """Unique drawn ids with log(count / num_draws), padded to V with invalid entries."""
    N, V = p.shape
    draws = torch.multinomial(p, num_draws, replacement=True, generator=gen)
    counts = torch.zeros(N, V).scatter_add_(1, draws, torch.ones(N, num_draws))
    valid = counts > 0
    ids = torch.arange(V).expand(N, V).clone()
    logprobs = torch.where(valid, (counts / num_draws).log(), -math.inf)
    return KDTargets(ids=ids, logprobs=logprobs, tail=torch.zeros(N), valid=valid,
                     labels=torch.full((N,), -100))


def test_sampled_estimator_mean_matches_full_kl_and_gradient() -> None:
    torch.manual_seed(7)
    N, V, draws, reps = 3, 16, 256, 300
    t = torch.randn(N, V) * 1.5
    p = torch.softmax(t, -1)
    s = torch.randn(N, V, requires_grad=True)
    full = full_divergence("fkl", t, s.detach(), 1.0).float()
    full_grad = torch.autograd.grad(full_divergence("fkl", t, s, 1.0).sum(), s)[0].float()
    gen = torch.Generator().manual_seed(0)
    spec = LossSpec(sampled=True)
    spec.validate()
    vals, grads = [], []
    for _ in range(reps):
        tg = _sampled_targets(p, draws, gen)
        kd = position_loss(torch.log_softmax(s, -1), tg, spec)[1]
        vals.append(kd.detach())
        grads.append(torch.autograd.grad(kd.sum(), s)[0])
    mean = torch.stack(vals).mean(0)
    # The value carries the plug-in entropy bias, about (support - 1) / (2 * draws) nats.
    torch.testing.assert_close(mean, full, atol=(V - 1) / (2 * draws) + 0.02, rtol=0)
    # The gradient is unbiased.
    torch.testing.assert_close(torch.stack(grads).mean(0), full_grad, atol=0.01, rtol=0)


def test_sampled_chunked_equals_unchunked() -> None:
    torch.manual_seed(8)
    N, H, V = 11, 7, 16
    gen = torch.Generator().manual_seed(1)
    tg = _sampled_targets(torch.softmax(torch.randn(N, V), -1), 32, gen)
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    spec = LossSpec(sampled=True)
    ref = full_kd_loss(h, w, None, tg, spec)
    gh, gw = torch.autograd.grad(ref, [h, w])
    out = SparseKDLoss(spec, chunk_size=4)(h, _head(w, None), tg, normalizer=1.0).loss
    gh2, gw2 = torch.autograd.grad(out, [h, w])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gh2, gh)
    torch.testing.assert_close(gw2, gw)


def test_class_kl() -> None:
    torch.manual_seed(9)
    t, s = torch.randn(5, 3), torch.randn(5, 3)
    lp, lq = torch.log_softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    torch.testing.assert_close(class_kl(t, s, 2.0), 4 * (lp.exp() * (lp - lq)).sum(-1))
    torch.testing.assert_close(class_kl(t, t), torch.zeros(5), atol=1e-7, rtol=0)


def test_class_loss_module_mixes_ce_and_counts_agreement() -> None:
    torch.manual_seed(10)
    t, s = torch.randn(6, 3), torch.randn(6, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, -100, 1, 0])
    out = ClassKDLoss(LossSpec(alpha=0.25, temperature=2.0))(s, ClassTargets(logits=t, labels=labels))
    kd = class_kl(t, s.detach(), 2.0)
    ce = -torch.log_softmax(s.detach(), -1)[torch.arange(6), labels.clamp_min(0)] * (labels >= 0)
    torch.testing.assert_close(out.kd_loss, kd.mean())
    torch.testing.assert_close(out.ce_loss, ce.mean())
    torch.testing.assert_close(out.loss, 0.75 * kd.mean() + 0.25 * ce.mean())
    torch.testing.assert_close(out.top1_agreement, (s.argmax(-1) == t.argmax(-1)).float().mean())
    out.loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_full_distribution_targets_equal_top_k_with_k_equal_vocab() -> None:
    """The online teacher's targets (k = V as broadcast views) give the same loss and gradients as stored k = V."""
    h1, w1, _, _ = _inputs(17, 11, 23, 4, bias=False)
    teacher_logits = torch.randn(17, 23) * 2
    stored = topk_targets(teacher_logits, k=23)
    online = KDTargets.full_distribution(teacher_logits, stored.labels)
    loss = SparseKDLoss(LossSpec(kind="jsd", temperature=1.5, alpha=0.1), chunk_size=6)
    a = loss(h1, _head(w1, None), stored)
    a.loss.backward()
    h2, w2, _, _ = _inputs(17, 11, 23, 4, bias=False)
    b = loss(h2, _head(w2, None), online)
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("spec", "setting"),
    [
        (LossSpec(kind="kl"), "kind"),
        (LossSpec(temperature=0.0), "temperature"),
        (LossSpec(alpha=1.5), "alpha"),
        (LossSpec(kind="jsd", beta=1.0), "beta"),
        (LossSpec(kind="rkl", sampled=True), "kind"),
        (LossSpec(temperature=2.0, sampled=True), "temperature"),
    ],
)
def test_bad_loss_settings_are_refused(spec: LossSpec, setting: str) -> None:
    with pytest.raises(LossSettingError) as exc:
        spec.validate()
    assert isinstance(exc.value, ValueError) and exc.value.setting == setting
    with pytest.raises(LossSettingError, match="chunk_size"):
        SparseKDLoss(LossSpec(), chunk_size=0)


@pytest.mark.parametrize(("overrides", "flag"), [({"loss": "rkl"}, "--loss"), ({"temperature": 2.0}, "--temperature")])
def test_trainer_names_the_flag_of_a_bad_loss_setting(overrides: dict, flag: str) -> None:
    from pipeline.train.build import loss_spec
    from pipeline.train.config import TrainConfig

    cfg = TrainConfig(cache="c", student="s", out="o", max_steps=1, **overrides)
    with pytest.raises(ConfigError, match=rf"sampled.*\(flag {flag}\)"):
        loss_spec(cfg, sampled=True)
    assert loss_spec(cfg, sampled=False).sampled is False


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_no_tail_bucket_is_the_renormalised_top_k(kind: str) -> None:
    """``tail_bucket=False`` == the same loss on targets renormalised over the ids with tail 0."""
    torch.manual_seed(5)
    logits_t, logits_s = torch.randn(7, 40) * 2, torch.randn(7, 40)
    tg = topk_targets(logits_t, k=6)
    lq = torch.log_softmax(logits_s, -1)
    renorm = tg.logprobs - torch.logsumexp(tg.logprobs, -1, keepdim=True)
    want = position_loss(lq, replace(tg, logprobs=renorm, tail=torch.zeros_like(tg.tail)),
                         LossSpec(kind=kind, temperature=1.5))[0]
    got = position_loss(lq, tg, LossSpec(kind=kind, temperature=1.5, tail_bucket=False))[0]
    torch.testing.assert_close(got, want)
    if kind == "fkl":
        # The peers' objective at T=1: cross-entropy of the full student log-softmax at the ids
        # against the renormalised teacher top-k, minus the (constant) teacher entropy.
        spec = LossSpec(kind="fkl", tail_bucket=False)
        fkl = position_loss(lq, tg, spec)[0]
        p = renorm.exp()
        torch.testing.assert_close(fkl, (p * (renorm - lq.gather(1, tg.ids))).sum(-1))


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_no_tail_bucket_chunked_equals_unchunked_and_all_masked_is_zero(kind: str) -> None:
    spec = LossSpec(kind=kind, temperature=1.7, alpha=0.2, tail_bucket=False)
    h1, w1, b1, tg = _inputs(29, 13, 41, 5, True)
    ref = full_kd_loss(h1, w1, b1, tg, spec)
    ref.backward()
    h2, w2, b2, _ = _inputs(29, 13, 41, 5, True)
    out = SparseKDLoss(spec, chunk_size=6)(h2, _head(w2, b2), tg, normalizer=1.0).loss
    out.backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-6, rtol=1e-4)
    h, w, b, empty = _inputs(0, 8, 11, 3, bias=True)
    loss = SparseKDLoss(spec)(h, _head(w, b), empty).loss
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(w.grad).all()
