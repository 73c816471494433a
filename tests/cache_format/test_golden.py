"""Golden caches: fixed contents, pinned hashes. A failure here means the bytes a writer produces
changed: that is a format change, which needs a version bump in SPEC.md and new pins.

``topk`` is pinned twice: written with ``id_coding="planes"`` it is a format 1.0 cache, and
``topk-set`` is the 1.1 default. Both carry SPEC §3.1's normaliser of 1.1 (float64 mass, the tail
kept exact up to the grid), so the planes cache differs from what the 1.0 writer wrote: those
bytes live in ``helpers.golden10``, which writes the 1.0 writer's caches (codes, metadata and, with
pyarrow 26, file bytes) from literals, and the tests below open, decode and verify them.

Two pins per shard: ``content`` (sha256 of the decoded Arrow table: schema, metadata, every value)
must always match; ``file`` (the shard's sha256 as the manifest records it) is checked when the
pyarrow major version equals the one that produced the pin, since zstd output may change with the
compression library even when the format does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cache_format import (
    CacheWriter,
    ClassLogitsBatch,
    ClassLogitsEncoding,
    SampledBatch,
    SampledEncoding,
    TopKBatch,
    TopKEncoding,
    open_cache,
    verify_cache,
)
from helpers.cache import identity
from helpers.golden10 import GOLDEN_10, write_golden_10

PINNED_PYARROW_MAJOR = 26


def golden_topk() -> tuple[object, TopKBatch]:
    lp = np.log(np.array([[0.5, 0.2, 0.1, 0.05], [0.9, 0.05, 0.01, 0.001], [0.3, 0.3, 0.2, 0.1],
                          [0.25, 0.25, 0.25, 0.25], [0.97, 0.01, 1e-5, 1e-20]], dtype=np.float64)).astype(np.float32)
    ids = np.array([[5, 17, 299, 0], [1, 2, 3, 4], [250, 251, 7, 8], [10, 11, 12, 13], [42, 43, 44, 45]], np.int32)
    batch = TopKBatch(sample_ids=["empty", "one-token", "doc-7#0"],
                      input_ids=[np.zeros(0, np.int32), np.array([3], np.int32), np.array([1, 5, 9, 2, 8, 4], np.int32)],
                      positions=[np.zeros(0, np.int32), np.zeros(0, np.int32), np.arange(5, dtype=np.int32)],
                      ids=ids, logprobs=lp, labels=[None, None, 1])
    return identity(TopKEncoding(k=4), vocab=300), batch


def golden_sampled() -> tuple[object, SampledBatch]:
    draws = np.array([[1, 1, 2, 9], [299, 0, 299, 299], [5, 5, 5, 5]], np.int32)
    batch = SampledBatch(sample_ids=["a", "b"], input_ids=[np.array([4, 4, 4], np.int32), np.array([7, 8], np.int32)],
                         positions=[np.array([0, 1], np.int32), np.array([0], np.int32)], draws=draws)
    return identity(SampledEncoding(num_draws=4), vocab=300), batch


def golden_class() -> tuple[object, ClassLogitsBatch]:
    return (identity(ClassLogitsEncoding(num_classes=2, labels=["neg", "pos"]), vocab=300),
            ClassLogitsBatch(sample_ids=["s1", "s2"], logits=np.array([[1.5, -0.25], [-3.0, 2.0]], np.float32),
                             labels=[1, None]))


PINS = {
    "topk-set": {"content": "409ab9fd3dc0f4bf7e033e939820213c0be9af8a034485cb28fd1c9c722c0818",
                 "file": "cf17f7c2826e673bdc7e207d66e201cf94f41287024ceac62c06f88e7be630c6"},
    "topk": {"content": "7222959e68f66425d65dabfacf9c23a0c60578fd8d457485c47c60784ebf74c1",
             "file": "ab422c0118ea83cb80256e39db6a0f325206745ff3e0a273a7cfe02c82be7634"},
    "sampled": {"content": "42a1d2c285c8bedc49317a187f0f56234c5eaed60e6c42d662ec7f7d54f33d7e",
                "file": "2ee964d3dfadac0bbad3295775ac035eddcdfddc1a983fa2a77d0ab443bea289"},
    "class_logits": {"content": "48d32d9bc1f8f9056cd17adacc83cdad9e18be71ba14fa41ada5d12e020c2efa",
                     "file": "177279327ab2fa7801f5b18353f0ea9a2e1eccc310b18de330b7c528953d86df"},
}
BUILDERS = {"topk": golden_topk, "topk-set": golden_topk, "sampled": golden_sampled, "class_logits": golden_class}
# The topk cache is written with the 1.0 id coding too; everything else uses the defaults.
WRITER_OPTIONS = {"topk": {"id_coding": "planes"}}
VERSIONS = {"topk-set": "1.1"}
# What kdpipe's 1.0 writer produced for the same builders (helpers.golden10 rewrites it from literals).
PINS_10 = {
    "topk": {"content": "d433300866aec039f193f4aa6d6b28d5481e4f646a4e1ed9ae738b60d8f6fd27",
             "file": "e348f44b0332896314c82406d504b02bc8328b310cb1981b26406ccefb470777"},
    "sampled": {"content": "42a1d2c285c8bedc49317a187f0f56234c5eaed60e6c42d662ec7f7d54f33d7e",
                "file": "2ee964d3dfadac0bbad3295775ac035eddcdfddc1a983fa2a77d0ab443bea289"},
    "class_logits": {"content": "48d32d9bc1f8f9056cd17adacc83cdad9e18be71ba14fa41ada5d12e020c2efa",
                     "file": "177279327ab2fa7801f5b18353f0ea9a2e1eccc310b18de330b7c528953d86df"},
}


def content_hash(path: Path) -> str:
    table = pa.ipc.open_file(str(path)).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    blob = json.dumps({"schema": str(table.schema.remove_metadata()), "metadata": meta, "rows": table.to_pylist()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_golden_cache_bytes_are_pinned(kind: str, tmp_path: Path) -> None:
    ident, batch = BUILDERS[kind]()
    with CacheWriter(tmp_path / kind, ident, **WRITER_OPTIONS.get(kind, {})) as w:  # type: ignore[arg-type]
        w.write(batch)
        w.end_unit(0)
        manifest = w.finalize()
    verify_cache(tmp_path / kind)
    assert manifest["format_version"] == VERSIONS.get(kind, "1.0")
    assert len(manifest["shards"]) == 1
    shard = tmp_path / kind / manifest["shards"][0]["name"]
    got = {"content": content_hash(shard), "file": manifest["shards"][0]["sha256"]}
    assert got["content"] == PINS[kind]["content"], f"{kind}: shard content changed (format change?): {got}"
    if int(pa.__version__.split(".")[0]) == PINNED_PYARROW_MAJOR:
        assert got["file"] == PINS[kind]["file"], f"{kind}: shard bytes changed: {got}"


@pytest.mark.parametrize("id_coding", ["planes", "set"])
def test_golden_topk_decodes_to_pinned_values(tmp_path: Path, id_coding: str) -> None:
    ident, batch = golden_topk()
    with CacheWriter(tmp_path / "g", ident, id_coding=id_coding) as w:  # type: ignore[arg-type]
        w.write(batch)
        w.finalize()
    rows = list(open_cache(tmp_path / "g").iter_rows())
    assert [len(r.positions) for r in rows] == [0, 0, 5]
    r = rows[2]
    assert r.label == 1
    np.testing.assert_array_equal(r.ids, batch.ids)
    # Worked by hand from SPEC §3.1 (writer rule 1.1): p = (.5, .2, .1, .05), tail .15 -> q = (6, 13, 18, 24);
    # M = sum(exp(-q/8)) = 0.824465; (ln M - ln(1 - .15)) * 32768 = -999.50 -> norm_code -999 (nearest;
    # the tail stays >= 0 down to ceil(ln M * 32768) = -6324); logprob = -q/8 + 999/32768;
    # tail' = 1 - exp(-999/32768) * M = 0.150013 (the exact tail, up to the grid) -> tail_code 3885.
    np.testing.assert_allclose(r.logprobs[0], [-0.719513, -1.594513, -2.219513, -2.969513], atol=1e-6)
    np.testing.assert_allclose(r.tail[0], np.exp(-3885 / 2048), rtol=1e-6)
    total = np.exp(r.logprobs.astype(np.float64)).sum(1) + r.tail
    assert np.all(np.abs(total - 1.0) <= 2.5e-4 * r.tail + 1e-5)


def test_planes_and_set_decode_alike_up_to_ties(tmp_path: Path) -> None:
    """The tie rule of SPEC §3.1.1: same log-prob sequence and tail; ids differ only inside a run of equal
    quantized values, where 1.0 keeps the teacher's order and 1.1 ascending rank (the top-1 stays first)."""
    rng = np.random.default_rng(3)
    n, k = 40, 16
    ids = np.stack([rng.choice(300, k, replace=False) for _ in range(n)]).astype(np.int32)
    lp = np.sort(np.log(rng.dirichlet(np.full(k, 0.5), n) * 0.95), axis=1)[:, ::-1]
    lp[:, 4:9] = lp[:, 4:5]  # a run of exact ties in every position
    batch = TopKBatch(sample_ids=["r0", "r1"], input_ids=[np.arange(21, dtype=np.int32)] * 2,
                      positions=[np.arange(20, dtype=np.int32)] * 2, ids=ids, logprobs=lp.astype(np.float32))
    decoded = {}
    for coding in ("planes", "set"):
        with CacheWriter(tmp_path / coding, identity(TopKEncoding(k=k), vocab=300), id_coding=coding) as w:
            w.write(batch)
            w.finalize()
        rows = list(open_cache(tmp_path / coding).iter_rows())
        decoded[coding] = [np.concatenate([getattr(r, f) for r in rows]) for f in ("ids", "logprobs", "tail")]
    (ids_p, lp_p, tail_p), (ids_s, lp_s, tail_s) = decoded["planes"], decoded["set"]
    np.testing.assert_array_equal(lp_p, lp_s)
    np.testing.assert_array_equal(tail_p, tail_s)
    np.testing.assert_array_equal(ids_p, batch.ids)  # 1.0: the teacher's order, ties included
    np.testing.assert_array_equal(ids_s[:, 0], ids_p[:, 0])  # 1.1 keeps the teacher's top-1 first
    run = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(lp_s[:, 1:] != lp_s[:, :-1], axis=1)], axis=1)
    for t in range(n):  # per run of equal values: the same ids; 1.1 lists them by rank
        for r in np.unique(run[t]):
            assert sorted(ids_p[t][run[t] == r]) == sorted(ids_s[t][run[t] == r])
    assert (ids_p != ids_s).any(), "the test data must contain reordered ties"


@pytest.mark.parametrize("kind", sorted(GOLDEN_10))
def test_golden_10_cache_reads_and_verifies(kind: str, tmp_path: Path) -> None:
    """A cache written in format 1.0 opens, decodes, verifies, and keeps its 1.0 identity fingerprint."""
    root = write_golden_10(tmp_path / kind, kind)
    manifest = json.loads((root / "manifest.json").read_text())
    shard = root / manifest["shards"][0]["name"]
    assert content_hash(shard) == PINS_10[kind]["content"], f"{kind}: the 1.0 fixture no longer holds the 1.0 bytes"
    if int(pa.__version__.split(".")[0]) == PINNED_PYARROW_MAJOR:
        assert manifest["shards"][0]["sha256"] == PINS_10[kind]["file"]
    assert verify_cache(root)["rows"] == len(GOLDEN_10[kind][3])
    reader = open_cache(root)
    assert reader.manifest.format_version == "1.0"
    # A 1.0 cache keeps its 1.0 fingerprint: recomputed by the 1.0 rule (SPEC appendix A), it matches.
    assert reader.identity.fingerprint("1.0") == manifest["identity_fingerprint"]
    assert reader.identity.fingerprint("1.1") != manifest["identity_fingerprint"]
    ident, batch = BUILDERS[kind]()
    assert reader.identity.comparable() == ident.comparable()  # type: ignore[attr-defined]
    rows = list(reader.iter_rows())
    assert [r.sample_id for r in rows] == list(batch.sample_ids)  # type: ignore[attr-defined]


def test_golden_10_topk_decodes_to_pinned_values(tmp_path: Path) -> None:
    rows = list(open_cache(write_golden_10(tmp_path / "g", "topk")).iter_rows())
    r = rows[2]
    np.testing.assert_array_equal(r.ids, golden_topk()[1].ids)
    # Worked by hand with the 1.0 writer's rule (SPEC appendix A): M = 0.824465; ln(M + .15) = -0.025862 ->
    # norm_code = ceil(-847.45) = -847; tail' = 1 - exp(-847/32768) * M = 0.153947 -> tail_code 3832.
    np.testing.assert_allclose(r.logprobs[0], [-0.724152, -1.599152, -2.224152, -2.974152], atol=1e-6)
    np.testing.assert_allclose(r.tail[0], np.exp(-3832 / 2048), rtol=1e-6)
    total = np.exp(r.logprobs.astype(np.float64)).sum(1) + r.tail
    assert np.all(np.abs(total - 1.0) <= 2.5e-4 * r.tail + 1e-5)
