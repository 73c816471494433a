"""Streaming dataset and collation: disjoint parts per rank × worker covering the cache once per
epoch, reproducible order, exact resume, held-out slice, padded tensors with aligned targets."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cache_format import open_cache
from helpers.train import one_torch_thread, write_random_cache
from pipeline.errors import ConfigError, DatasetError
from pipeline.train import stream as stream_mod
from pipeline.train.collate import collate_rows
from pipeline.train.stream import CacheStream, StreamLoader, iter_eval_batches

one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    return write_random_cache(tmp_path_factory.mktemp("c5") / "cache", tiny_tokenizer, rows=24, max_shard_rows=5)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    return write_random_cache(tmp_path_factory.mktemp("c1") / "cache", tiny_tokenizer, rows=21)


def _epoch_refs(cache: Path, world: int, workers: int, eval_rows: int = 0, epoch: int = 0) -> list[list[tuple]]:
    reader = open_cache(str(cache))
    parts = []
    for rank in range(world):
        s = CacheStream(reader, batch_size=2, pad_id=0, rank=rank, world_size=world, eval_rows=eval_rows)
        for w in range(workers):
            c, n = rank * workers + w, world * workers
            parts.append([(r.shard_index, r.row_index) for r in s._epoch_rows(reader, epoch, c, n)])
    return parts


@pytest.mark.parametrize("cache_name", ["five_shards", "one_shard"])
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 2), (1, 3)])
def test_parts_are_disjoint_and_cover_the_cache_once_per_epoch(request, cache_name, world, workers) -> None:
    cache = request.getfixturevalue(cache_name)
    total = open_cache(str(cache)).manifest.num_rows
    for epoch in (0, 1):
        parts = _epoch_refs(cache, world, workers, epoch=epoch)
        flat = [r for p in parts for r in p]
        assert len(flat) == len(set(flat)) == total
        assert all(parts), "every consumer gets rows"


def test_held_out_rows_are_excluded_from_training(five_shards: Path) -> None:
    parts = _epoch_refs(five_shards, 2, 1, eval_rows=3)
    train = {r for p in parts for r in p}
    last = len(open_cache(str(five_shards)).manifest.shards) - 1
    held = {(int(a), int(b)) for batch in iter_eval_batches(str(five_shards), eval_rows=3, batch_size=2, pad_id=0)
            for a, b in batch["row_ref"].tolist()}
    assert held == {(last, 0), (last, 1), (last, 2)}
    assert not train & held and len(train) == 24 - 3


def _take(loader, n: int) -> list[list[list[int]]]:
    return [next(loader)["row_ref"].tolist() for _ in range(n)]


def test_order_is_reproducible_and_seeded(five_shards: Path) -> None:
    def run(seed: int):
        return _take(StreamLoader(CacheStream(str(five_shards), batch_size=3, pad_id=0, seed=seed, shuffle_buffer=4)), 12)

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    # 12 batches x 3 = 36 rows: the first epoch (24 rows) holds every row once
    first_epoch = [tuple(r) for batch in a for r in batch][:24]
    assert len(set(first_epoch)) == 24


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(five_shards: Path, workers: int) -> None:
    def make() -> StreamLoader:
        return StreamLoader(CacheStream(str(five_shards), batch_size=2, pad_id=0, seed=3, shuffle_buffer=5,
                                        rank=1, world_size=2), num_workers=workers)

    straight = _take(make(), 20)  # ~12 rows per epoch for this rank: crosses two epoch ends
    for stop in (4, 9, 13):
        first = make()
        _take(first, stop)
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert _take(resumed, 20 - stop) == straight[stop:]


def test_epoch_sizes_from_the_manifest_match_the_rows_read(five_shards: Path) -> None:
    reader = open_cache(str(five_shards))
    for world in (1, 2, 3, 7):
        s = CacheStream(reader, batch_size=1, pad_id=0, world_size=world, eval_rows=2)
        for c in range(world):
            for epoch in (0, 1, 2):
                assert s._epoch_size(epoch, c, world) == sum(1 for _ in s._epoch_rows(reader, epoch, c, world))


def test_resume_with_changed_settings_is_refused(five_shards: Path) -> None:
    a = StreamLoader(CacheStream(str(five_shards), batch_size=2, pad_id=0))
    next(a)
    b = StreamLoader(CacheStream(str(five_shards), batch_size=4, pad_id=0))
    with pytest.raises(ConfigError, match="batch_size"):
        b.load_state_dict(a.state_dict())


def test_worker_split_through_dataloader_info(five_shards: Path, monkeypatch) -> None:
    """Inside a loader worker the stream uses get_worker_info to pick its part."""
    got = []
    for wid in range(2):
        monkeypatch.setattr(stream_mod, "get_worker_info", lambda wid=wid: SimpleNamespace(num_workers=2, id=wid))
        s = CacheStream(str(five_shards), batch_size=1, pad_id=0, shuffle_buffer=1)
        it = iter(s)
        got.append({tuple(next(it)["row_ref"][0].tolist()) for _ in range(10)})
    assert not got[0] & got[1]


def test_collate_topk_shapes_and_alignment(one_shard: Path) -> None:
    reader = open_cache(str(one_shard))
    rows = [reader.read_row(0, 0), reader.read_row(0, 1)]
    rows[1].input_ids = rows[1].input_ids[:6]  # a shorter row to exercise padding
    rows[1].positions = rows[1].positions[:5]
    rows[1].ids, rows[1].logprobs, rows[1].tail = rows[1].ids[:5], rows[1].logprobs[:5], rows[1].tail[:5]
    b = collate_rows(rows, "topk", pad_id=0)
    B, T, k = 2, len(rows[0].input_ids), rows[0].ids.shape[1]
    assert b["ids"].shape == b["logprobs"].shape == b["valid"].shape == (B, T, k)
    assert b["tail"].shape == b["target_mask"].shape == b["labels"].shape == b["input_ids"].shape == (B, T)
    assert int(b["num_targets"]) == len(rows[0].positions) + 5
    # labels[t] = input_ids[t + 1]; none for the last token or padding
    assert b["labels"][0, :-1].tolist() == rows[0].input_ids[1:].tolist() and int(b["labels"][0, -1]) == -100
    assert b["labels"][1, 5:].eq(-100).all() and b["attention_mask"][1].sum() == 6
    t = int(rows[0].positions[2])
    assert b["ids"][0, t].tolist() == rows[0].ids[2].tolist()
    torch.testing.assert_close(b["logprobs"][0, t], torch.from_numpy(rows[0].logprobs[2]))
    # buckets sum to one at every target
    mass = b["logprobs"].exp().sum(-1) + b["tail"]
    assert torch.allclose(mass[b["target_mask"]], torch.ones(()), atol=1e-4)
    assert not b["valid"][~b["target_mask"]].any()


def test_collate_sampled_and_class(tmp_path: Path, tiny_tokenizer) -> None:
    sampled = open_cache(str(write_random_cache(tmp_path / "s", tiny_tokenizer, kind="sampled", rows=4)))
    b = collate_rows(list(sampled.iter_rows()), "sampled", pad_id=0)
    lp = b["logprobs"][b["valid"]]
    assert torch.isfinite(lp).all() and torch.isinf(b["logprobs"][~b["valid"]]).all()
    assert torch.allclose(b["logprobs"].exp().sum(-1)[b["target_mask"]], torch.ones(()), atol=1e-5)
    assert (b["tail"] == 0).all()
    classes = open_cache(str(write_random_cache(tmp_path / "c", tiny_tokenizer, kind="class_logits", rows=5,
                                                num_classes=3)))
    b = collate_rows(list(classes.iter_rows()), "class_logits", pad_id=0)
    assert b["class_logits"].shape == (5, 3) and b["class_labels"].shape == (5,) and int(b["num_targets"]) == 5


def test_collate_refuses_ids_beyond_the_student_vocab(one_shard: Path) -> None:
    row = open_cache(str(one_shard)).read_row(0, 0)
    small = int(np.max(row.ids))
    with pytest.raises(DatasetError, match="vocabulary size"):
        collate_rows([row], "topk", pad_id=0, vocab_size=small)


def test_too_many_consumers_for_the_rows_is_an_error(tmp_path: Path, tiny_tokenizer) -> None:
    cache = write_random_cache(tmp_path / "c", tiny_tokenizer, rows=2)
    s = CacheStream(str(cache), batch_size=1, pad_id=0, rank=2, world_size=3)
    with pytest.raises(DatasetError, match="got no rows"):
        next(iter(s))
