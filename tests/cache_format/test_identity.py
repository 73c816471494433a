"""CacheIdentity.diff/fingerprint, encodings' validation, tokenizer_fingerprint without transformers."""

from __future__ import annotations

import pytest

from cache_format import (
    CacheIdentity,
    ClassLogitsEncoding,
    SampledEncoding,
    TopKEncoding,
    tokenizer_fingerprint,
)
from cache_format.errors import EncodingError
from helpers.cache import identity


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int], specials: list[str]) -> None:
        self._vocab, self.all_special_tokens = vocab, specials

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab)


def test_diff_names_each_field_and_ignores_run() -> None:
    a = identity(run={"worker": 0})
    b = CacheIdentity(teacher={**a.teacher, "revision": "r2"}, tokenizer=a.tokenizer, recipe=a.recipe,
                      dataset={**a.dataset, "split": "test"}, encoding=TopKEncoding(k=16), run={"worker": 1})
    assert a.diff(b) == ["dataset.split: 'train' != 'test'", "encoding.k: 8 != 16", "teacher.revision: 'r1' != 'r2'"]
    assert a.diff(identity(run={"worker": 7})) == [] and a.fingerprint() == identity(run={"worker": 7}).fingerprint()
    assert a.fingerprint() != b.fingerprint()
    assert CacheIdentity.from_dict(a.to_dict()).diff(a) == []


def test_encodings_validate() -> None:
    with pytest.raises(EncodingError, match=r"k must be"):
        TopKEncoding(k=0)
    with pytest.raises(EncodingError, match=r"num_draws.*uint8"):
        SampledEncoding(num_draws=256)
    with pytest.raises(EncodingError, match=r"2 names but num_classes=3"):
        ClassLogitsEncoding(num_classes=3, labels=["a", "b"])
    with pytest.raises(EncodingError, match=r"vocab_size"):
        CacheIdentity(teacher={}, tokenizer={}, recipe={}, dataset={}, encoding=TopKEncoding(k=2))
    with pytest.raises(EncodingError, match=r"JSON"):
        CacheIdentity(teacher={"x": object()}, tokenizer={"vocab_size": 3}, recipe={}, dataset={},
                      encoding=TopKEncoding(k=2))


def test_padded_model_vocab_raises_the_id_limit() -> None:
    ident = identity()
    assert ident.id_limit == 1000
    padded = CacheIdentity(teacher={}, tokenizer={"vocab_size": 1000, "model_vocab_size": 1024}, recipe={},
                           dataset={}, encoding=TopKEncoding(k=2))
    assert padded.id_limit == 1024


def test_tokenizer_fingerprint_is_order_independent_and_sensitive() -> None:
    a = FakeTokenizer({"a": 0, "b": 1, "<s>": 2}, ["<s>"])
    b = FakeTokenizer({"<s>": 2, "b": 1, "a": 0}, ["<s>"])
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a).startswith("sha256:")
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(FakeTokenizer({"a": 0, "b": 2, "<s>": 1}, ["<s>"]))
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(FakeTokenizer({"a": 0, "b": 1, "<s>": 2}, []))
    with pytest.raises(TypeError, match=r"get_vocab"):
        tokenizer_fingerprint(object())


def test_tokenizer_fingerprint_of_a_real_hf_tokenizer(tiny_tokenizer: object) -> None:
    fp = tokenizer_fingerprint(tiny_tokenizer)
    assert fp == tokenizer_fingerprint(tiny_tokenizer) and len(fp) == len("sha256:") + 64
