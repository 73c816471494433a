"""Metric functions against known values from their reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.eval import metrics


def test_accuracy_and_length_mismatch() -> None:
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="pair up"):
        metrics.accuracy([1], [1, 0])


def test_bleu_matches_evaluate_docstring_example() -> None:
    # The example in evaluate's metrics/bleu card, with the numbers it prints.
    out = metrics.bleu(
        ["hello there general kenobi", "foo bar foobar"],
        [["hello there general kenobi", "hello there!"], ["foo bar foobar"]],
    )
    assert out == {
        "bleu": 1.0,
        "precisions": [1.0, 1.0, 1.0, 1.0],
        "brevity_penalty": 1.0,
        "length_ratio": 1.1666666666666667,
        "translation_length": 7,
        "reference_length": 6,
    }


def test_bleu_matches_sacrebleu_without_smoothing_on_single_references() -> None:
    # With one reference per segment nmt BLEU and sacrebleu (13a, no smoothing) coincide.
    import sacrebleu

    preds = ["the cat sat on the mat", "a quick brown fox jumps over it"]
    refs = ["the cat is on the mat", "the quick brown fox jumps over the dog"]
    ours = metrics.bleu(preds, refs)
    ref = sacrebleu.corpus_bleu(preds, [refs], smooth_method="none", tokenize="13a")
    assert ours["bleu"] == pytest.approx(ref.score / 100, abs=1e-12)
    assert ours["bleu"] == pytest.approx(0.4623497127905122)
    assert ours["brevity_penalty"] == pytest.approx(ref.bp)
    assert ours["precisions"] == pytest.approx([p / 100 for p in ref.precisions])


def test_bleu_zero_when_a_higher_order_has_no_match_and_empty_prediction() -> None:
    assert metrics.bleu(["the cat sat on the mat today"], ["the cat is sitting on the mat"])["bleu"] == 0.0
    empty = metrics.bleu([""], ["some reference"])
    assert empty["bleu"] == 0.0 and empty["brevity_penalty"] == 0.0


def test_rouge_matches_rouge_score_readme_example() -> None:
    # rouge-score's README: rouge1 F 0.70588, rougeL F 0.58824 for this pair.
    out = metrics.rouge(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
    assert out["rouge1"] == pytest.approx(0.7058823529411765)
    assert out["rouge2"] == pytest.approx(0.26666666666666666)
    assert out["rougeL"] == pytest.approx(0.5882352941176471)
    assert out["rougeLsum"] == pytest.approx(0.5882352941176471)


def test_rouge_equals_evaluate_aggregation_and_leaves_global_rng_alone() -> None:
    from rouge_score import rouge_scorer, scoring

    preds = ["hello there", "general kenobi you are", "a b c d", "the cat sat"]
    refs = ["hello there", "general kenobi", "a c d e", "the cat is sitting"]
    # What evaluate's rouge does, with numpy's global RNG seeded the same way.
    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=False)
    agg = scoring.BootstrapAggregator()
    for r, p in zip(refs, preds, strict=True):
        agg.add_scores(scorer.score(r, p))
    np.random.seed(metrics.ROUGE_BOOTSTRAP_SEED)
    expected = {k: v.mid.fmeasure for k, v in agg.aggregate().items()}

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ours = metrics.rouge(preds, refs)
    assert np.array_equal(np.random.get_state()[1], before)
    assert ours == pytest.approx(expected, abs=0)
    assert metrics.rouge(["hello there", "general kenobi"], ["hello there", "general kenobi"]) == {
        "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0,
    }


def test_rouge_multi_reference_takes_best() -> None:
    out = metrics.rouge(["the cat sat"], [["a dog ran", "the cat sat"]])
    assert out["rouge1"] == 1.0


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Janet sells 9 eggs.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("so the total is $1,234.50.", "1234.5"),
        ("first 3 then 4 so the answer is -7", "-7"),
        ("#### 5.0", "5"),
        ("no number here", None),
    ],
)
def test_extract_final_number(text: str, want: str | None) -> None:
    assert metrics.extract_final_number(text) == want


def test_gsm8k_exact_match() -> None:
    preds = ["The answer is 18.", "x #### 7", "nothing"]
    refs = ["a\n#### 18", "b #### 8", "c #### 1"]
    assert metrics.gsm8k_exact_match(preds, refs) == pytest.approx(1 / 3)


def test_lm_token_stats_known_values() -> None:
    # Position 0 favours label 0 slightly, position 1 strongly favours label 2; position 2 is masked.
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 0] = 1.0
    logits[0, 1, 2] = 10.0
    labels = torch.tensor([[0, 2, 3]])
    mask = torch.tensor([[1, 1, 0]])
    stats = metrics.lm_token_stats(logits, labels, mask)
    assert stats.tokens == 2 and stats.correct_top1 == 2 and stats.correct_top5 == 2
    nll = (math.log(math.e + 3) - 1) + (math.log(math.exp(10) + 3) - 10)
    assert stats.nll_sum == pytest.approx(nll, rel=1e-5)
    total = metrics.LMStats()
    total.add(stats)
    assert total.summary()["perplexity"] == pytest.approx(math.exp(nll / 2), rel=1e-5)
    assert metrics.perplexity(0.0, 0) == math.inf


def test_agreement_dense_and_sparse_agree_when_k_is_the_vocabulary() -> None:
    torch.manual_seed(0)
    student = torch.randn(6, 8)
    teacher = torch.randn(6, 8)
    dense = metrics.agreement_dense(student, teacher)
    ref_kl = torch.nn.functional.kl_div(
        torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True, reduction="sum"
    )
    assert dense.kl_sum == pytest.approx(float(ref_kl), rel=1e-5)
    t_lp, t_ids = torch.log_softmax(teacher, -1).sort(dim=-1, descending=True)
    sparse = metrics.agreement_sparse(student, t_ids, t_lp, torch.zeros(6))
    assert sparse.top1_agree == dense.top1_agree
    assert sparse.kl_sum == pytest.approx(dense.kl_sum, rel=1e-4, abs=1e-5)
    assert metrics.agreement_dense(teacher, teacher).summary()["top1_agreement"] == 1.0


def test_agreement_sparse_tail_bucket() -> None:
    # Teacher keeps 2 of 4 tokens (0.5, 0.3) and a tail of 0.2; student is uniform.
    student = torch.zeros(1, 4)
    ids = torch.tensor([[1, 3]])
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    out = metrics.agreement_sparse(student, ids, lp, None)
    want = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert out.kl_sum == pytest.approx(want, rel=1e-5)


def test_format_params() -> None:
    assert metrics.format_params(14_400_000) == "14.4M"
    assert metrics.format_params(1_500_000_000) == "1.5B"
    assert metrics.format_params(950) == "950"


def test_agreement_sparse_ignores_sampled_padding_and_unsorted_ids() -> None:
    # A sampled row: unique ids in any order, padded with (id 0, log-prob -1e9); no tail.
    student = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    ids = torch.tensor([[2, 1, 0]])
    lp = torch.log(torch.tensor([[0.25, 0.75, 1.0]]))
    lp[0, 2] = -1e9
    out = metrics.agreement_sparse(student, ids, lp, torch.zeros(1))
    assert out.top1_agree == 1  # the teacher's most likely is id 1 (column 1), the student's argmax too
    s = torch.log_softmax(student, -1)[0]
    want = 0.25 * (math.log(0.25) - float(s[2])) + 0.75 * (math.log(0.75) - float(s[1]))
    assert out.kl_sum == pytest.approx(want, rel=1e-5)
