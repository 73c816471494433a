"""A streaming ``IterableDataset`` over a cache: disjoint parts per rank × loader worker,
shuffle buffer, reproducible order, exact resume.

**Split.** The consumers are ``world_size × num_workers`` (rank-major). Each epoch the
training shards are permuted with ``(seed, epoch)``. With at least as many shards as
consumers, consumer ``c`` reads shards ``perm[c::n]`` (no shard is read twice); with fewer
shards, every consumer reads all shards and keeps every ``n``-th row (row ``i`` of the
epoch's order goes to ``i mod n``), so small caches still split evenly. Either way the
consumers' parts are disjoint and their union is the training part of the cache, once per
epoch.

**Order.** Each consumer passes its rows through a shuffle buffer of ``shuffle_buffer``
rows seeded by ``(seed, epoch, consumer)``; the buffer is drained at the end of an epoch so
epochs never mix. Memory holds the buffer plus one batch, never the cache.

**Batches** are collated inside the stream (``DataLoader(batch_size=None)``). The stream
is endless (epoch after epoch); the trainer stops after ``max_steps``.

**Position.** :class:`StreamLoader` counts the batches handed to the trainer. Resuming
skips that many batches deterministically: whole epochs are skipped from the manifest's row
counts, and the rows already consumed in the current epoch are decoded again (not collated)
so the shuffle buffer is rebuilt exactly — at most one epoch of decoding. The DataLoader
returns worker ``i mod num_workers``'s batch as batch ``i``, so each worker knows which
part it plays and how many of its own batches to skip.

**Held-out slice.** The first ``eval_rows`` rows of the last shard are kept out of training
and served by :func:`iter_eval_batches`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import ConfigError, DatasetError
from pipeline.train.collate import collate_rows


def _open(cache: Any, storage_options: dict[str, Any] | None, verify_checksums: bool) -> Any:
    """A reader of ``cache`` (a path/URL, or an open reader used as is); ``verify_checksums``: each shard's
    sha256 is checked as the shard is opened, in whichever process (loader worker) reads it."""
    if not isinstance(cache, str):
        return cache
    from cache_format import open_cache

    return open_cache(cache, storage_options=storage_options, verify_checksums=verify_checksums)


def cache_kind(reader: Any) -> str:
    """``topk``, ``sampled`` or ``class_logits`` from the manifest's encoding."""
    return str(reader.manifest.identity.encoding.kind)


class CacheStream(IterableDataset):
    """Endless stream of collated batches from one consumer's part of a cache (see module doc)."""

    def __init__(
        self,
        cache: str | Any,
        *,
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
        rank: int = 0,
        world_size: int = 1,
        eval_rows: int = 0,
        vocab_size: int | None = None,
        storage_options: dict[str, Any] | None = None,
        verify_checksums: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size (flag --batch-size) must be >= 1, got {batch_size}")
        if shuffle_buffer < 1:
            raise ConfigError(f"shuffle_buffer (flag --shuffle-buffer) must be >= 1, got {shuffle_buffer}")
        self.cache = cache
        self.storage_options = storage_options
        self.verify_checksums = verify_checksums
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.eval_rows = eval_rows
        self.vocab_size = vocab_size
        self.skip_batches = 0  # set by StreamLoader.load_state_dict
        reader = _open(cache, storage_options, verify_checksums)
        self.kind = cache_kind(reader)
        self.shard_rows = [int(s.rows) for s in reader.manifest.shards]
        if self.train_rows == 0:
            raise DatasetError(
                f"cache {cache} has no training rows ({sum(self.shard_rows)} rows, {self._held_out()} held out "
                "for evaluation); dump more data or lower --eval-rows"
            )

    def _held_out(self) -> int:
        return min(self.eval_rows, self.shard_rows[-1]) if self.shard_rows else 0

    @property
    def train_rows(self) -> int:
        """Rows used for training (the cache minus the held-out slice)."""
        return sum(self.shard_rows) - self._held_out()

    def _is_held_out(self, shard: int, row: int) -> bool:
        return shard == len(self.shard_rows) - 1 and row < self._held_out()

    def _consumer(self) -> tuple[int, int, int, int]:
        """(consumer id, consumers, this worker's role, workers) for the current process.

        A fresh DataLoader asks worker 0 for the first batch, but after ``skip_batches`` batches
        the next one belongs to worker ``skip_batches mod workers``: worker ``w`` of a resumed
        loader plays the role of worker ``(w + skip_batches) mod workers`` of the original run.
        """
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        role = (worker + self.skip_batches) % workers
        return self.rank * workers + role, self.world_size * workers, role, workers

    def _shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shard_rows)))
        random.Random(f"{self.seed}-shards-{epoch}").shuffle(order)
        return order

    def _epoch_size(self, epoch: int, consumer: int, n: int) -> int:
        """Rows this consumer reads in ``epoch``, from the manifest alone (no decoding)."""
        order = self._shard_order(epoch)
        if len(order) >= n:
            last = len(self.shard_rows) - 1
            return sum(self.shard_rows[s] - (self._held_out() if s == last else 0) for s in order[consumer::n])
        return len(range(consumer, self.train_rows, n))

    def _epoch_rows(self, reader: Any, epoch: int, consumer: int, n: int) -> Iterator[Any]:
        order = self._shard_order(epoch)
        if len(order) >= n:
            for shard in order[consumer::n]:
                for row in reader.iter_rows(shards=[shard]):
                    if not self._is_held_out(shard, row.row_index):
                        yield row
            return
        i = 0
        for shard in order:
            for row in reader.iter_rows(shards=[shard]):
                if self._is_held_out(shard, row.row_index):
                    continue
                if i % n == consumer:
                    yield row
                i += 1

    def _rows(self, reader: Any, consumer: int, n: int, epoch: int = 0) -> Iterator[Any]:
        while True:
            rng = random.Random(f"{self.seed}-buffer-{epoch}-{consumer}")
            buf: list[Any] = []
            produced = False
            for row in self._epoch_rows(reader, epoch, consumer, n):
                produced = True
                if len(buf) < self.shuffle_buffer:
                    buf.append(row)
                    continue
                j = rng.randrange(len(buf))
                buf[j], row = row, buf[j]
                yield row
            rng.shuffle(buf)
            yield from buf
            if not produced:
                raise DatasetError(
                    f"cache {self.cache}: consumer {consumer} of {n} (rank x loader worker) got no rows; use "
                    "fewer ranks/--num-workers or a cache with more rows"
                )
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        consumer, n, role, workers = self._consumer()
        if get_worker_info() is not None:
            torch.set_num_threads(1)  # loader workers decode; leave the cores to the training process
        reader = _open(self.cache, self.storage_options, self.verify_checksums)
        # Rows this worker already delivered (batch i of the loader came from worker i mod workers).
        # Whole epochs are skipped from the manifest's row counts; only the rows of the current
        # epoch are read again (decoded, not collated) to rebuild the shuffle buffer exactly.
        skip = len(range(role, self.skip_batches, workers)) * self.batch_size
        epoch = 0
        while skip > 0 and 0 < self._epoch_size(epoch, consumer, n) <= skip:
            skip -= self._epoch_size(epoch, consumer, n)
            epoch += 1
        batch: list[Any] = []
        for row in self._rows(reader, consumer, n, epoch):
            if skip > 0:
                skip -= 1
                continue
            batch.append(row)
            if len(batch) == self.batch_size:
                yield collate_rows(batch, self.kind, self.pad_id, self.vocab_size)
                batch = []


def _from_worker(exc: Exception) -> Exception:
    """A DataLoader worker's error as the worker raised it: torch re-raises it with the worker's traceback in
    the message ("Caught X in DataLoader worker process 0. Original Traceback ..."), which would turn a
    one-line error (a checksum mismatch, a corrupt shard) into a traceback on the user's screen."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if not (text.startswith("Caught ") and "Original Traceback" in text and marker in text):
        return exc
    try:
        return type(exc)(text.rsplit(marker, 1)[-1].strip())
    except Exception:  # an exception class that cannot be rebuilt from its message stays as it was
        return exc


class StreamLoader:
    """A DataLoader over :class:`CacheStream` that knows its position (``state_dict``)."""

    def __init__(self, stream: CacheStream, num_workers: int = 0) -> None:
        if num_workers < 0:
            raise ConfigError(f"num_workers (flag --num-workers) must be >= 0, got {num_workers}")
        self.stream = stream
        self.num_workers = num_workers
        self.batches = 0
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    def _identity(self) -> dict[str, Any]:
        s = self.stream
        return {"seed": s.seed, "batch_size": s.batch_size, "world_size": s.world_size,
                "num_workers": self.num_workers, "shuffle_buffer": s.shuffle_buffer, "eval_rows": s.eval_rows,
                "shard_rows": list(s.shard_rows)}

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self.stream.skip_batches = self.batches
            loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                persistent_workers=False)
            self._it = iter(loader)
        try:
            batch = next(self._it)
        except Exception as exc:
            raise _from_worker(exc) from None
        self.batches += 1
        return batch

    def __iter__(self) -> StreamLoader:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._identity()
        changed = [f"{k}: checkpoint {state.get(k)!r} != now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if changed:
            raise ConfigError(
                "cannot resume the data stream exactly because its settings changed ("
                + "; ".join(changed) + "); resume with the original settings or start a new run with --overwrite"
            )
        self.batches = int(state["batches"])
        self._it = None


def iter_eval_batches(
    cache: str | Any, *, eval_rows: int, batch_size: int, pad_id: int, vocab_size: int | None = None,
    storage_options: dict[str, Any] | None = None, verify_checksums: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of the held-out slice: the first ``eval_rows`` rows of the cache's last shard."""
    reader = _open(cache, storage_options, verify_checksums)
    shards = reader.manifest.shards
    if eval_rows <= 0 or not shards:
        return
    kind = cache_kind(reader)
    last = len(shards) - 1
    batch: list[Any] = []
    for row in reader.iter_rows(shards=[last]):
        if row.row_index >= eval_rows:
            break
        batch.append(row)
        if len(batch) == batch_size:
            yield collate_rows(batch, kind, pad_id, vocab_size)
            batch = []
    if batch:
        yield collate_rows(batch, kind, pad_id, vocab_size)
