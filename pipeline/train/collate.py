"""Decoded cache rows → padded training batches (tensors) with the sparse targets.

Shapes: ``B`` rows, ``T`` = longest row in the batch, ``k`` = entries per position (for
``sampled`` caches: the largest number of unique draws at any position of the batch).

| key | shape, dtype | meaning |
|---|---|---|
| ``input_ids`` | ``[B, T]`` int64 | tokens, right-padded with ``pad_id`` |
| ``attention_mask`` | ``[B, T]`` int64 | 1 for real tokens |
| ``target_mask`` | ``[B, T]`` bool | position carries a teacher distribution |
| ``labels`` | ``[B, T]`` int64 | next token ``input_ids[t + 1]``; -100 where there is none |
| ``ids`` | ``[B, T, k]`` int64 | cached token ids (0 where empty) |
| ``logprobs`` | ``[B, T, k]`` float32 | teacher log-probs (``-inf`` where empty) |
| ``tail`` | ``[B, T]`` float32 | teacher mass outside ``ids`` (0 for sampled caches) |
| ``valid`` | ``[B, T, k]`` bool | entry is real (not padding) |
| ``class_logits`` | ``[B, C]`` float32 | ``class_logits`` caches only |
| ``class_labels`` | ``[B]`` int64 | ``class_logits`` caches only; -100 = none |
| ``num_targets`` | ``[]`` int64 | target positions (rows for ``class_logits``) in the batch |
| ``row_ref`` | ``[B, 2]`` int64 | (shard index, row index) of each row, for tracing and tests |

Alignment (docs/ARCHITECTURE.md): cached position ``t`` is compared with the student's
``logits[:, t]`` directly; its hard label is ``input_ids[t + 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import DatasetError


def collate_rows(rows: Sequence[Any], kind: str, pad_id: int, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Pad ``rows`` (``cache_format.DecodedRow``) of a ``topk``/``sampled``/``class_logits`` cache.

    ``vocab_size``, when given, is the student's: a cached id at or above it stops with an
    error naming the shard and row (the manifest check catches this earlier for honest caches).
    """
    if not rows:
        raise DatasetError("collate_rows got no rows; the cache (or this rank's part of it) is empty")
    B = len(rows)
    T = max(1, max(len(r.input_ids) for r in rows))
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention = np.zeros((B, T), dtype=np.int64)
    for b, r in enumerate(rows):
        input_ids[b, : len(r.input_ids)] = r.input_ids
        attention[b, : len(r.input_ids)] = 1
    out: dict[str, torch.Tensor] = {"input_ids": torch.from_numpy(input_ids),
                                    "attention_mask": torch.from_numpy(attention),
                                    "row_ref": torch.tensor([[r.shard_index, r.row_index] for r in rows])}
    if kind == "class_logits":
        out["class_logits"] = torch.from_numpy(np.stack([np.asarray(r.class_logits, np.float32) for r in rows]))
        out["class_labels"] = torch.tensor([-100 if r.label is None else int(r.label) for r in rows])
        out["num_targets"] = torch.tensor(B)
        return out
    k = max(1, max((r.ids.shape[1] if r.ids is not None and r.ids.ndim == 2 else 0) for r in rows))
    ids = np.zeros((B, T, k), dtype=np.int64)
    logprobs = np.full((B, T, k), -np.inf, dtype=np.float32)
    valid = np.zeros((B, T, k), dtype=bool)
    tail = np.zeros((B, T), dtype=np.float32)
    target = np.zeros((B, T), dtype=bool)
    labels = np.full((B, T), -100, dtype=np.int64)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        labels[b, : max(0, n - 1)] = r.input_ids[1:n]
        pos = np.asarray(r.positions, dtype=np.int64)
        if pos.size == 0:
            continue
        kr = r.ids.shape[1]
        target[b, pos] = True
        ids[b, pos, :kr] = r.ids
        logprobs[b, pos, :kr] = r.logprobs
        tail[b, pos] = r.tail
        # sampled rows pad unique draws with count 0; topk rows are all valid
        valid[b, pos, :kr] = (r.counts > 0) if r.counts is not None else True
        if vocab_size is not None and r.ids.size and int(r.ids.max()) >= vocab_size:
            raise DatasetError(
                f"shard {r.shard_index} row {r.row_index} (sample_id {r.sample_id!r}) holds token id "
                f"{int(r.ids.max())} >= the student's vocabulary size {vocab_size}; use a student whose "
                "vocabulary covers the teacher's"
            )
    logprobs[~valid] = -np.inf
    ids[~valid] = 0
    out.update(ids=torch.from_numpy(ids), logprobs=torch.from_numpy(logprobs), valid=torch.from_numpy(valid),
               tail=torch.from_numpy(tail), target_mask=torch.from_numpy(target), labels=torch.from_numpy(labels),
               num_targets=torch.tensor(int(target.sum())))
    return out
