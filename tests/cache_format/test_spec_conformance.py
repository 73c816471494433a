"""SPEC.md's own code and numbers against the implementation.

- §2.2's fingerprint snippet (a second implementation, taken from the SPEC text as a reader would
  paste it) gives the writer's values: tokenizer fingerprint of a real HF tokenizer, identity
  fingerprint of a written cache, dataset fingerprint and teacher weights revision of folders; its
  canonical JSON is RFC 8785's (the RFC's own examples).
- §3.1's bounds hold for what the writer writes: the sum bound (evaluated in float64 from the
  integer codes, as a reader would), the tail accuracy and the worst-case log-prob error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import cache_format
from cache_format import (
    CacheIdentity,
    CacheWriter,
    TopKBatch,
    TopKEncoding,
    open_cache,
    tokenizer_fingerprint,
)
from cache_format.codec import NORM_SCALE, TAIL_SCALE, TAIL_ZERO, encode_topk, row_undelta
from cache_format.identity import canonical_json
from cache_format.manifest import MANIFEST_NAME
from helpers.cache import identity, topk_batch
from pipeline.dump.fingerprints import dataset_fingerprint, weights_revision
from pipeline.dump.run import local_weights_hash

SPEC = (Path(cache_format.__file__).parent / "SPEC.md").read_text()


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """The functions of SPEC §2.2's fingerprint snippet."""
    m = re.search(r"<!-- snippet: fingerprints.*?-->\s*```python\n(.*?)```", SPEC, re.S)
    assert m, "SPEC.md lost its fingerprints snippet"
    namespace: dict[str, Any] = {}
    exec(m.group(1), namespace)  # the snippet as a reader would paste it
    return namespace


# ---------------------------------------------------------------- canonical JSON (RFC 8785)

RFC8785_INPUT = ('{"numbers":[333333333.33333329,1E30,4.50,2e-3,0.000000000000000000000000001],'
                 '"string":"\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/","literals":[null,true,false]}')
RFC8785_OUTPUT = ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
                  '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}')
# RFC 8785 §3.2.3: member names sorted by UTF-16 code units (the emoji's surrogates sort before U+FB33).
SORTING = {"\u20ac": 1, "\r": 2, "\ufb33": 3, "1": 4, "\U0001f600": 5, "\u0080": 6, "\u00f6": 7}
SORTED_KEYS = ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
NUMBERS = {0.0: "0", 1.0: "1", 0.125: "0.125", 1e-5: "0.00001", 1e-6: "0.000001", 1e-7: "1e-7",
           1.5e-7: "1.5e-7", 1e20: "100000000000000000000", 1e21: "1e+21", 123.456: "123.456", -2.5: "-2.5",
           5e-324: "5e-324", 1.7976931348623157e308: "1.7976931348623157e+308", 2**60: "1152921504606847000"}


@pytest.mark.parametrize("impl", ["spec", "library"])
def test_canonical_json_is_rfc8785(impl: str, spec: dict[str, Any]) -> None:
    jcs = spec["canonical_json"] if impl == "spec" else canonical_json
    assert jcs(json.loads(RFC8785_INPUT)) == RFC8785_OUTPUT
    assert list(json.loads(jcs(SORTING))) == SORTED_KEYS
    for x, text in NUMBERS.items():
        assert jcs(x) == text, x
    assert jcs(-0.0) == "0"
    assert jcs({"a": [1, "x\u2028\x7f\x1f\u00e9"], "b": None}) == '{"a":[1,"x\u2028\x7f\\u001fé"],"b":null}'


def test_canonical_numbers_agree_on_random_doubles(spec: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000),
                         rng.integers(-10**6, 10**6, 500) / 8.0, 10.0 ** np.arange(-25, 26)])
    for x in xs.tolist():
        assert spec["jcs_number"](x) == canonical_json(x), x
        assert float(canonical_json(x)) == x  # shortest digits that read back exactly


# ---------------------------------------------------------------- fingerprints vs the writer


def test_tokenizer_fingerprint_follows_the_spec(spec: dict[str, Any], tiny_tokenizer: Any) -> None:
    tok = tiny_tokenizer
    want = spec["tokenizer_fingerprint"](tok.get_vocab(), tok.all_special_tokens, len(tok))
    assert tokenizer_fingerprint(tok) == want

    class Odd:  # tokens that need escaping, non-ASCII and astral characters, two tokens on one id
        all_special_tokens: ClassVar[list[str]] = ["<s>", "</s>", "\u00e9"]

        def get_vocab(self) -> dict[str, int]:
            return {"<s>": 0, "</s>": 1, "\u00e9": 2, "a\nb": 3, 'q"\\': 4, "\U0001f600": 5, "\u00e9\u0301": 2}

    assert tokenizer_fingerprint(Odd()) == spec["tokenizer_fingerprint"](Odd().get_vocab(), Odd.all_special_tokens, 7)


def test_identity_fingerprint_of_a_written_cache_follows_the_spec(spec: dict[str, Any], tmp_path: Path) -> None:
    ident = identity(TopKEncoding(k=8, value_step=0.0625, temperature=0.7), vocab=1000, run={"host": "x"})
    ident = CacheIdentity(teacher=ident.teacher, tokenizer=ident.tokenizer, dataset=ident.dataset,
                          recipe={**ident.recipe, "template": "Résumé — {text} \U0001f600\n", "ratio": 1e-7},
                          encoding=ident.encoding, run=ident.run)
    with CacheWriter(tmp_path / "c", ident) as w:
        w.write(topk_batch(["a", "b"]))
        w.finalize()
    m = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    stored = m["identity_fingerprint"]
    read = open_cache(tmp_path / "c").identity
    assert read.fingerprint(m["format_version"]) == stored
    assert read.fingerprint("1.1") == spec["identity_fingerprint"](m["identity"])
    if m["format_version"] != "1.0":  # 1.0 caches: appendix A's rule (tests/cache_format/test_golden.py)
        assert stored == spec["identity_fingerprint"](m["identity"])
    # `run` and unknown members are not hashed; the hashed object's members are sorted, not the manifest's order.
    assert spec["identity_fingerprint"]({**m["identity"], "run": {}, "extra": 1}) == read.fingerprint("1.1")


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_dataset_fingerprint_follows_the_spec(spec: dict[str, Any], tmp_path: Path) -> None:
    files = {"train/part-0001.jsonl": b'{"text": "a"}\n', "train/part-0000.jsonl": b"", "b.txt": b"x" * 70000,
             "train/Z.txt": b"upper case sorts first", "caf\u00e9.txt": "é".encode()}
    _tree(tmp_path, files)
    paths = [tmp_path / n for n in files]
    got = dataset_fingerprint(tmp_path, paths)
    assert got == spec["dataset_fingerprint"](str(tmp_path), list(files))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", got)
    assert dataset_fingerprint(tmp_path, reversed(paths)) == got  # order of discovery does not matter
    (tmp_path / "b.txt").write_bytes(b"x" * 69999 + b"y")
    assert dataset_fingerprint(tmp_path, paths) != got
    single = tmp_path / "train" / "Z.txt"
    assert dataset_fingerprint(single.parent, [single]) == spec["tree_digest"](str(single.parent), ["Z.txt"])


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_tree_digest_is_what_sha256sum_prints(tmp_path: Path) -> None:
    names = ["b.bin", "a/x.json", "A.txt"]
    _tree(tmp_path, {n: n.encode() * 3 for n in names})
    env = {**os.environ, "LC_ALL": "C"}
    listing = subprocess.run(["sha256sum", *sorted(names)], cwd=tmp_path, env=env, capture_output=True, check=True).stdout
    outer = subprocess.run(["sha256sum"], input=listing, capture_output=True, check=True).stdout.split()[0].decode()
    assert dataset_fingerprint(tmp_path, [tmp_path / n for n in names]) == "sha256:" + outer


def test_teacher_revision_follows_the_spec(spec: dict[str, Any], tmp_path: Path) -> None:
    model = tmp_path / "model"
    _tree(model, {"model.safetensors": b"w" * 1000, "config.json": b"{}", "generation_config.json": b"{ }",
                  "tokenizer_config.json": b"{}", "tokenizer.json": b"{}", "optimizer.pt": b"o" * 5000,
                  "training_args.bin": b"t", "README.md": b"r", "checkpoint-1/model.safetensors": b"c"})
    (tmp_path / "blob").write_bytes(b"linked weights")
    (model / "pytorch_model.bin").symlink_to(tmp_path / "blob")  # a hub cache snapshot links to blobs
    got = local_weights_hash(model)
    assert got == weights_revision(model) == spec["weights_revision"](str(model))
    assert got == spec["tree_digest"](str(model), ["config.json", "generation_config.json", "model.safetensors",
                                                    "pytorch_model.bin"])
    for name in ("tokenizer_config.json", "optimizer.pt", "checkpoint-1/model.safetensors", "README.md"):
        (model / name).write_bytes(b"changed")  # not part of the model's revision
    assert local_weights_hash(model) == got
    (model / "config.json").write_bytes(b'{"x": 1}')
    assert local_weights_hash(model) != got
    assert local_weights_hash(tmp_path / "model" / "checkpoint-1") == spec["weights_revision"](str(model / "checkpoint-1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert local_weights_hash(empty) is None and spec["weights_revision"](str(empty)) is None


# ---------------------------------------------------------------- §3.1 bounds


def _case(rng: np.random.Generator, n: int, k: int, tail_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """[n, k] log-probs (descending) whose exact tails spread over many magnitudes around ``tail_scale``."""
    logits = rng.standard_normal((n, k)) * rng.uniform(0.1, 6.0, (n, 1))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    tail = np.minimum(tail_scale * 10.0 ** rng.uniform(-2, 2, (n, 1)), 0.9)
    lps = np.sort(np.log(p * (1 - tail)), axis=1)[:, ::-1]
    return np.ascontiguousarray(lps).astype(np.float32), rng.permuted(np.tile(np.arange(k), (n, 1)), axis=1)


@pytest.mark.parametrize(("k", "step", "tail_scale"), [(8, 0.125, 1e-3), (64, 0.125, 1e-6), (64, 0.0625, 1e-2),
                                                       (200, 0.5, 1e-4), (3, 1.0, 1e-8)])
def test_sum_bound_and_tail_accuracy_hold(k: int, step: float, tail_scale: float) -> None:
    rng = np.random.default_rng(k)
    lps, ids = _case(rng, 4000, k, tail_scale)
    e = encode_topk(ids, lps, None, value_step=step, id_limit=1000, locate=str)
    q = row_undelta(e.values, np.array([0, e.values.size])).reshape(-1, k).astype(np.float64)
    norm, code = e.norm_code.astype(np.float64), e.tail_code.astype(np.float64)
    # Decoded exactly as SPEC §3.1 says, in float64 from the integer codes.
    logprob = -q * step - norm[:, None] / NORM_SCALE
    tail = np.where(code == TAIL_ZERO, 0.0, np.exp(-code / TAIL_SCALE))
    total = np.exp(logprob).sum(axis=1) + tail
    assert np.all(np.abs(total - 1) <= 2.5e-4 * tail + 1e-12)  # 1e-5 is slack for float32 readers and 1.0 writers
    exact = np.clip(1 - np.exp(lps.astype(np.float64)).sum(axis=1), 0, 1)
    big = exact >= 1.53e-5
    assert np.all(np.abs(tail - exact)[big] <= 1.53e-5 + 2.45e-4 * tail[big])
    assert np.all(tail[~big] <= 3.06e-5)
    above = lps.astype(np.float64) > -255 * step  # the floor aside, |logprob - l| <= step + 2^-15
    assert np.all(np.abs(logprob - lps)[above] <= step + 2**-15 + 1e-6)


def test_a_top_k_far_above_one_is_refused() -> None:
    from cache_format.errors import EncodingError

    lps = np.full((1, 64), -0.01, np.float32)  # mass 63: raw logits, not log-probs
    with pytest.raises(EncodingError, match=r"probability mass of .* far above 1"):
        encode_topk(np.arange(64)[None], lps, None, value_step=0.125, id_limit=100, locate=lambda i: f"position {i}")


def test_reader_applies_exactly_the_spec_bound(tmp_path: Path) -> None:
    """Whatever the writer writes passes the reader's row check; the check's constants are the SPEC's."""
    from cache_format.encodings import topk

    assert (topk.SUM_REL_TOLERANCE, topk.SUM_ABS_TOLERANCE) == (2.5e-4, 1e-5)
    assert "|S[t] − 1| ≤ 2.5e-4 · tail[t] + 1e-5" in SPEC
    rng = np.random.default_rng(3)
    lps, ids = _case(rng, 11 * 40, 64, 1e-5)
    batch = TopKBatch(sample_ids=[f"r{i}" for i in range(40)], input_ids=[np.arange(12, dtype=np.int32)] * 40,
                      positions=[np.arange(11, dtype=np.int32)] * 40, ids=ids.astype(np.int32), logprobs=lps)
    with CacheWriter(tmp_path / "c", identity(TopKEncoding(k=64), vocab=1000)) as w:
        w.write(batch)
        w.finalize()
    assert sum(len(r.positions) for r in open_cache(tmp_path / "c").iter_rows()) == 440
