"""What the teacher sees in LM rows: BOS per window, overlapping windows (stride), provenance, recorded recipe."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.dump.datasets import LoadedDataset
from pipeline.dump.lm import parse_lm_sample_id
from pipeline.dump.tasks import RecipeConfig, build_examples
from pipeline.errors import ConfigError, DatasetError

L = 16  # max_length of the windows below: small, so the test corpus spans many windows


def _ds(texts: list[str]) -> LoadedDataset:
    return LoadedDataset(columns={"text": texts}, num_rows=len(texts), source="mem", name="mem", config=None,
                         split=None, fingerprint="x")


@pytest.fixture(scope="module")
def texts(tiny_texts: list[str]) -> list[str]:
    """Documents with blank rows between some of them (dropped by the recipe, kept as row numbers)."""
    out: list[str] = []
    for i, t in enumerate(tiny_texts[:24]):
        out += [t, ""] if i % 5 == 0 else [t]
    return [" ", *out]


@pytest.fixture(scope="module")
def tok_without_auto_bos(tiny_tokenizer: Any) -> Any:
    """The tiny tokenizer with a BOS token that ``tokenizer(...)`` does not add (SmolLM2/GPT-2 style)."""
    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok("x")["input_ids"][0] != tok.bos_token_id
    return tok


@pytest.fixture(scope="module")
def tok_without_bos(tok_without_auto_bos: Any) -> Any:
    tok = copy.deepcopy(tok_without_auto_bos)
    tok.bos_token = None
    return tok


def _doc_tokens(tok: Any, text: str) -> list[int]:
    """A document as the recipe tokenizes it, written out independently: bare text, then EOS."""
    return [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]


def _lm(texts: list[str], tok: Any, **kw: Any) -> list[Any]:
    return build_examples(_ds(texts), tok, RecipeConfig(task="lm", max_length=kw.pop("max_length", L), **kw)).examples


def _stream_index(texts: list[str], tok: Any, pack: bool) -> dict[tuple[int, int], int]:
    """(dataset row, token offset) -> index in the packed stream (or in its own document when unpacked)."""
    index, pos = {}, 0
    for row, text in enumerate(texts):
        if not text.strip():
            continue
        pos = pos if pack else 0
        for off in range(len(_doc_tokens(tok, text))):
            index[(row, off)] = pos + off
        pos += len(_doc_tokens(tok, text))
    return index


# ----------------------------------------------------------------------------- BOS


@pytest.mark.parametrize("policy", ["auto", "always"])
def test_every_window_starts_with_bos(texts: list[str], tiny_tokenizer: Any, policy: str) -> None:
    bos = tiny_tokenizer.bos_token_id
    for pack in (True, False):
        rows = _lm(texts, tiny_tokenizer, bos=policy, stride=5, pack=pack)
        assert len(rows) > 5
        for r in rows:
            assert r.input_ids[0] == bos and int(np.sum(r.input_ids == bos)) == 1  # one BOS, in front
            assert r.positions[0] >= 0 and len(r.input_ids) <= L  # BOS is context: nothing predicts it


def test_bos_never_and_tokenizers_without_bos(texts: list[str], tiny_tokenizer: Any, tok_without_auto_bos: Any,
                                              tok_without_bos: Any) -> None:
    bos = tiny_tokenizer.bos_token_id
    assert all(bos not in r.input_ids for r in _lm(texts, tiny_tokenizer, bos="never"))
    assert all(bos not in r.input_ids for r in _lm(texts, tok_without_auto_bos, bos="auto"))  # follows the tokenizer
    assert all(r.input_ids[0] == bos for r in _lm(texts, tok_without_auto_bos, bos="always"))
    assert all(bos not in r.input_ids for r in _lm(texts, tok_without_bos, bos="auto"))
    for task, ds in (("lm", _ds(texts)), ("classification", LoadedDataset(
            columns={"sentence": ["a cat"]}, num_rows=1, source="mem", name="mem", config=None, split=None,
            fingerprint="x"))):
        with pytest.raises(ConfigError, match="--bos always"):
            build_examples(ds, tok_without_bos, RecipeConfig(task=task, max_length=L, bos="always"))  # type: ignore[arg-type]


def test_prompt_rows_never_start_with_two_bos(tiny_tokenizer: Any) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    # A chat template that writes BOS itself, as Llama-3's and Gemma's do.
    tok.chat_template = "<s>{% for m in messages %}<s>{{ m['content'] }}{% endfor %}"
    ds = LoadedDataset(columns={"question": ["two cats"], "answer": ["one"]}, num_rows=1, source="mem", name="mem",
                       config=None, split=None, fingerprint="x")
    bos = tok.bos_token_id
    for chat in (False, True):
        for policy, first in (("auto", [bos]), ("always", [bos]), ("never", [])):
            cfg = RecipeConfig(task="reasoning", max_length=64, chat_template=chat, bos=policy)  # type: ignore[arg-type]
            ids = build_examples(ds, tok, cfg).examples[0].input_ids.tolist()
            head = ids[: len(first) + 1]
            assert head[: len(first)] == first and head[len(first)] != bos, (chat, policy, ids)


# ----------------------------------------------------------------------------- stride and provenance


@pytest.mark.parametrize("bos", ["auto", "never"])
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("stride", [L - 1, 6, 1])
def test_stride_targets_every_token_once_with_context(texts: list[str], tiny_tokenizer: Any, bos: str, pack: bool,
                                                      stride: int) -> None:
    rows = _lm(texts, tiny_tokenizer, bos=bos, stride=stride, pack=pack)
    index = _stream_index(texts, tiny_tokenizer, pack)
    has_bos = bos == "auto"
    seen: list[tuple[int, int]] = []  # (document, stream index) of every target
    for n, r in enumerate(rows):
        src = parse_lm_sample_id(r.sample_id)
        key = src.doc if not pack else 0
        first = index[(src.doc, src.tok)]
        targets = r.input_ids[r.positions + 1]
        doc = _doc_tokens(tiny_tokenizer, texts[src.doc]) if not pack else None
        if doc is not None:
            np.testing.assert_array_equal(targets, doc[first : first + len(targets)])
        seen += [(key, first + i) for i in range(len(targets))]
        np.testing.assert_array_equal(r.positions, np.arange(r.positions[0], r.positions[0] + len(targets)))
        later = n > 0 and (pack or parse_lm_sample_id(rows[n - 1].sample_id).doc == src.doc)
        if later:  # every window but a stream's first sees >= max_length - stride tokens (BOS included)
            assert r.positions[0] + 1 >= L - stride
    streams: dict[int, int] = {}
    for (row, _), j in index.items():
        k = row if not pack else 0
        streams[k] = max(streams.get(k, 0), j + 1)
    expected = [(k, j) for k, n in streams.items() for j in range(0 if has_bos else 1, n)]
    assert sorted(seen) == sorted(expected)  # each token once; without BOS a stream's first token is context


def test_provenance_ids_point_at_the_source_text(texts: list[str], tiny_tokenizer: Any) -> None:
    for bos in ("auto", "never"):
        for r in _lm(texts, tiny_tokenizer, bos=bos, stride=7):
            src = parse_lm_sample_id(r.sample_id)
            assert texts[src.doc].strip() and texts[src.first_doc].strip()
            assert r.input_ids[r.positions[0] + 1] == _doc_tokens(tiny_tokenizer, texts[src.doc])[src.tok]
            first_stream_token = r.input_ids[1 if bos == "auto" else 0]
            assert first_stream_token == _doc_tokens(tiny_tokenizer, texts[src.first_doc])[src.first_tok]
    with pytest.raises(DatasetError, match="doc<D>:tok<T>"):
        parse_lm_sample_id("17")


def test_stride_is_validated(texts: list[str], tiny_tokenizer: Any) -> None:
    from pydantic import ValidationError

    from pipeline.dump.config import DumpConfig

    for bad in (0, L, L + 5):
        with pytest.raises(ConfigError, match="--stride"):
            _lm(texts, tiny_tokenizer, stride=bad)
    with pytest.raises(ConfigError, match="--stride applies to --task lm"):
        build_examples(_ds(texts), tiny_tokenizer, RecipeConfig(task="classification", max_length=L, stride=4,
                                                                text_field="text"))
    with pytest.raises(ValidationError, match="stride"):
        DumpConfig(teacher="t", dataset="d", out="o", stride=0)


# ----------------------------------------------------------------------------- the teacher's view


def test_window_nll_equals_unpacked_forward_with_bos(texts: list[str], tiny_tokenizer: Any, tiny_lm_dir: Path,
                                                     hf_teacher: Any, torch_one_thread: None) -> None:
    """The dump's teacher (batched, padded windows) gives each target the NLL the model gives the same
    text, re-tokenized from the provenance, in a forward of its own that starts with BOS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir), dtype=torch.float32).eval()
    rows = _lm(texts, tiny_tokenizer, stride=9, max_length=24)
    vocab = model.config.vocab_size
    ids, lps = hf_teacher.topk([r.input_ids for r in rows], [r.positions for r in rows], vocab)
    stream: list[int] = []
    starts = {}
    for row, text in enumerate(texts):
        if text.strip():
            starts[row] = len(stream)
            stream += _doc_tokens(tiny_tokenizer, text)
    offset = 0
    for r in rows:
        n = len(r.positions)
        targets = r.input_ids[r.positions + 1]
        cached = -lps[offset : offset + n][ids[offset : offset + n] == targets[:, None]]
        offset += n
        src = parse_lm_sample_id(r.sample_id)
        a = starts[src.first_doc] + src.first_tok
        alone = torch.tensor([[tiny_tokenizer.bos_token_id, *stream[a : a + len(r.input_ids) - 1]]])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=alone).logits[0].float(), dim=-1)
        ref = -logp[torch.as_tensor(r.positions, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)]
        np.testing.assert_allclose(cached, ref.numpy(), atol=1e-5, rtol=0)


def _rebuild(recipe: dict[str, Any], texts: list[str], tok: Any) -> list[tuple[str, list[int], list[int]]]:
    """Rows rebuilt from the identity's recipe facts alone (an independent reading of them); the file is one
    unit, and a document's key is the byte offset of its line."""
    assert recipe["units"]["rule"] == "bytes" and recipe["units"]["count"] == 1
    lm = recipe["lm"]
    keys = [sum(len(t.encode()) + 1 for t in texts[:i]) for i in range(len(texts))]
    bos = [recipe["bos_id"]] if recipe["bos_id"] is not None else []
    L_, S = recipe["max_length"], lm["stride"]
    docs = [(row, [*tok(t, add_special_tokens=recipe["add_special_tokens"])["input_ids"],
                   *([lm["eos_id"]] if lm["eos_after_document"] else [])])
            for row, t in zip(keys, texts, strict=True) if t.strip()]
    streams = [docs] if recipe["pack"] else [[d] for d in docs]
    out = []
    for group in streams:
        where = [(row, off) for row, d in group for off in range(len(d))]
        s = [t for _, d in group for t in d]
        t, end = (0 if bos else 1), min(L_ - 1 + (0 if bos else 1), len(s))
        while t < len(s):
            start = max(0, end - (L_ - len(bos)))
            sid = "doc{}:tok{}@doc{}:tok{}".format(*where[t], *where[start])
            lo = len(bos) + t - start - 1
            out.append((sid, bos + s[start:end], list(range(lo, lo + end - t))))
            t, end = end, min(end + S, len(s))
    return out


def test_identity_records_every_recipe_fact(texts: list[str], tiny_tokenizer: Any, tiny_lm_dir: Path,
                                            tmp_path: Path, torch_one_thread: None) -> None:
    from cache_format import open_cache
    from pipeline.dump.run import DumpConfig, run_dump

    data = tmp_path / "wiki.txt"
    data.write_text("\n".join(texts) + "\n")
    for pack, bos in ((True, "auto"), (False, "never")):
        out = tmp_path / f"c-{pack}-{bos}"
        run_dump(DumpConfig(teacher=str(tiny_lm_dir), dataset=str(data), out=str(out), top_k=4, max_length=20,
                            stride=7, pack=pack, bos=bos, unit_rows=8, device="cpu", progress=False))
        cache = open_cache(str(out))
        recipe = cache.manifest.identity.recipe
        assert recipe["bos"] == bos and recipe["bos_id"] == (tiny_tokenizer.bos_token_id if bos == "auto" else None)
        assert recipe["lm"]["stride"] == 7 and recipe["pack"] is pack and recipe["max_length"] == 20
        assert recipe["lm"]["attention_across_documents"] is pack and recipe["add_special_tokens"] is False
        assert "blank" in recipe["lm"]["documents"] and recipe["lm"]["sample_id"] == "doc<D>:tok<T>@doc<D0>:tok<T0>"
        assert cache.manifest.identity.dataset["format"] == "text"  # rows = lines, blank ones kept
        lines = data.read_text().splitlines()
        got = [(r.sample_id, r.input_ids.tolist(), r.positions.tolist()) for r in cache.iter_rows()]
        assert got == _rebuild(recipe, lines, tiny_tokenizer)


def test_identity_of_prompt_and_text_recipes(tiny_tokenizer: Any) -> None:
    rec = RecipeConfig(task="reasoning", max_length=64).identity(tiny_tokenizer)
    assert rec["bos"] == "auto" and rec["bos_id"] == tiny_tokenizer.bos_token_id and rec["add_special_tokens"] is True
    assert rec["response"] == {"separator": " ", "add_special_tokens": False, "eos_after": True} and rec["lm"] is None
    rec = RecipeConfig(task="summarization", max_length=64, chat_template=True, bos="never").identity(tiny_tokenizer)
    assert rec["bos_id"] is None and rec["add_special_tokens"] is False and rec["response"]["separator"] == ""
    rec = RecipeConfig(task="classification", max_length=64).identity(tiny_tokenizer)
    assert rec["response"] is None and rec["lm"] is None and rec["add_special_tokens"] is True
