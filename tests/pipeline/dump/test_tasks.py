"""Recipes: token ids and target positions for each task, truncation, chat templates."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.dump.datasets import LoadedDataset
from pipeline.dump.tasks import RecipeConfig, build_examples, fit_prompt_response
from pipeline.errors import ConfigError, DatasetError


def _ds(**columns: list[Any]) -> LoadedDataset:
    n = len(next(iter(columns.values())))
    return LoadedDataset(columns=columns, num_rows=n, source="mem", name="mem", config=None, split=None,
                         fingerprint="x")


def test_lm_packs_documents_into_full_windows(tiny_tokenizer: Any) -> None:
    # Documents go in bare, each followed by EOS; every window opens with BOS (the tokenizer adds one)
    # and, over all windows, the targets are the stream itself, each token once.
    texts = ["the cat sat on the mat.", "", "a dog ran fast and the tree was big.", "one two three."]
    res = build_examples(_ds(text=texts), tiny_tokenizer, RecipeConfig(task="lm", max_length=8))
    targets = np.concatenate([e.input_ids[e.positions + 1] for e in res.examples])
    docs = [t for t in texts if t]
    expected = np.concatenate([[*tiny_tokenizer(t, add_special_tokens=False)["input_ids"],
                                tiny_tokenizer.eos_token_id] for t in docs])
    np.testing.assert_array_equal(targets, expected)
    assert all(len(e.input_ids) == 8 for e in res.examples[:-1])
    assert all(e.input_ids[0] == tiny_tokenizer.bos_token_id for e in res.examples)
    assert res.stats["documents"] == 3 and res.stats["split_documents"] >= 1


def test_lm_without_packing_keeps_documents_apart(tiny_tokenizer: Any) -> None:
    res = build_examples(_ds(text=["the cat sat.", "a dog ran fast and the tree was big and red."]), tiny_tokenizer,
                         RecipeConfig(task="lm", max_length=6, pack=False))
    first_doc = [*tiny_tokenizer("the cat sat.")["input_ids"], tiny_tokenizer.eos_token_id]  # BOS + text + EOS
    assert res.examples[0].input_ids.tolist() == first_doc[:6]
    docs = [str(e.sample_id).split(":")[0] for e in res.examples]
    assert docs == ["doc0"] + ["doc1"] * (len(docs) - 1) and len(docs) > 2  # one row per window of a document
    assert res.stats["split_documents"] >= 1


def test_classification_rows_keep_labels(tiny_tokenizer: Any) -> None:
    res = build_examples(_ds(sentence=["good film", "bad film"], label=[1, "0"]), tiny_tokenizer,
                         RecipeConfig(task="classification", max_length=3))
    assert [e.label for e in res.examples] == [1, 0] and all(len(e.positions) == 0 for e in res.examples)
    assert all(len(e.input_ids) <= 3 for e in res.examples)
    res = build_examples(_ds(sentence=["a"], label=["positive"]), tiny_tokenizer,
                         RecipeConfig(task="classification", max_length=8), label2id={"negative": 0, "positive": 1})
    assert res.examples[0].label == 1
    with pytest.raises(DatasetError, match="not one of the teacher's labels"):
        build_examples(_ds(sentence=["a"], label=["meh"]), tiny_tokenizer,
                       RecipeConfig(task="classification", max_length=8), label2id={"negative": 0})


def test_prompt_response_targets_predict_response_tokens(tiny_tokenizer: Any) -> None:
    ds = _ds(**{"info.post": ["the cat sat on the mat.", ""], "info.article": [None, "a dog ran."],
                "summary.text": ["cat sat.", "dog ran."]})
    res = build_examples(ds, tiny_tokenizer, RecipeConfig(task="summarization", max_length=64))
    e = res.examples[0]
    prompt = tiny_tokenizer("the cat sat on the mat.\n\nTL;DR:")["input_ids"]
    response = [*tiny_tokenizer(" cat sat.", add_special_tokens=False)["input_ids"], tiny_tokenizer.eos_token_id]
    assert e.input_ids.tolist() == prompt + response
    np.testing.assert_array_equal(e.positions, np.arange(len(prompt) - 1, len(prompt) + len(response) - 1))
    assert "a dog ran." in tiny_tokenizer.decode(res.examples[1].input_ids)  # article used for an empty post


def test_reasoning_template_and_truncation(tiny_tokenizer: Any) -> None:
    q = " ".join(["the cat sat on the mat"] * 6)
    res = build_examples(_ds(question=[q], answer=["one two #### 2"]), tiny_tokenizer,
                         RecipeConfig(task="reasoning", max_length=20))
    e = res.examples[0]
    assert len(e.input_ids) == 20 and res.stats["truncated"] == 1
    assert e.input_ids[0] == tiny_tokenizer.bos_token_id  # BOS kept, the prompt is cut after it
    assert tiny_tokenizer.decode(e.input_ids[: e.positions[0] + 1]).endswith("Answer:")


def test_fit_prompt_response_cuts_prompt_first() -> None:
    assert fit_prompt_response([1, 5, 6, 7], [8, 9], 6, bos_id=1) == ([1, 5, 6, 7], [8, 9], False)
    assert fit_prompt_response([1, 5, 6, 7], [8, 9], 5, bos_id=1) == ([1, 6, 7], [8, 9], True)
    assert fit_prompt_response([1, 5], [8, 9, 10, 11], 4, bos_id=1) == ([1, 5], [8, 9], True)


def test_chat_template_wraps_prompt(tiny_tokenizer: Any) -> None:
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}</s>{% endif %}"
    res = build_examples(_ds(question=["two cats"], answer=["one"]), tok,
                         RecipeConfig(task="reasoning", max_length=64, chat_template=True))
    e = res.examples[0]
    prompt_text = tok.decode(e.input_ids[: e.positions[0] + 1])
    assert prompt_text.startswith("<s>Question: two cats") and prompt_text.endswith("</s>")


def test_bad_recipe_inputs(tiny_tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match=r"\{text\}"):
        build_examples(_ds(question=["q"], answer=["a"]), tiny_tokenizer,
                       RecipeConfig(task="reasoning", max_length=16, template="no placeholder"))
    with pytest.raises(DatasetError, match="--response-field"):
        build_examples(_ds(question=["q"]), tiny_tokenizer, RecipeConfig(task="reasoning", max_length=16))
    with pytest.raises(DatasetError, match="only empty texts"):
        build_examples(_ds(text=["", " "]), tiny_tokenizer, RecipeConfig(task="lm", max_length=16))
    with pytest.raises(ConfigError, match="--teacher-generates"):
        build_examples(_ds(text=["a"]), tiny_tokenizer, RecipeConfig(task="lm", max_length=16, teacher_generates=True))
    with pytest.raises(DatasetError, match="is int, not text"):
        build_examples(_ds(text=[3]), tiny_tokenizer, RecipeConfig(task="lm", max_length=16))
