"""Rows in flight: the writer's checked ``RowBlock``, the reader's ``DecodedRow``, and the row checks of every batch.

Writer side: batches are checked in the caller's thread for everything that is cheap and
structural (lengths, shapes, position order, duplicate sample ids), so a mistake fails at the
``write()`` that made it; numeric checks (NaN, ids >= vocab) run during encoding. Reader side:
:class:`BatchRows` and :func:`check_common` apply the spec's row rules to a whole decoded record
batch at once (vectorized), so no consumer ever sees a row that ``verify`` would reject. The
checks common to all encodings are here, the rest in ``encodings/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cache_format.errors import DuplicateError, EncodingError, InvariantError

# Longest sample_id in UTF-8 bytes, for writers and readers alike: it bounds what a record batch's
# sample_id column may decompress to (SPEC §5.1).
MAX_SAMPLE_ID_BYTES = 4096
INVALID_FIX = ("the shard breaks the format's row rules (damaged or edited after writing): run `kdpipe cache verify`, "
               "then re-copy the cache from an intact source or re-dump it")


@dataclass
class DecodedRow:
    """One sequence read back from a cache.

    ``topk``: ``ids`` int32 [n, k], ``logprobs`` float32 [n, k] (descending, renormalised with
    ``tail`` so the k+1 buckets sum to 1), ``tail`` float32 [n]. ``sampled``: ``ids``/``counts``/
    ``logprobs`` padded to the row's largest unique count (padding: id 0, count 0, log-prob
    -1e9), ``tail`` zeros. ``class_logits``: ``class_logits`` float32 [C]; no positions.
    """

    sample_id: str
    input_ids: np.ndarray
    positions: np.ndarray
    ids: np.ndarray | None = None
    logprobs: np.ndarray | None = None
    tail: np.ndarray | None = None
    counts: np.ndarray | None = None
    label: int | None = None
    class_logits: np.ndarray | None = None
    shard_index: int = -1
    row_index: int = -1

    @property
    def target_mask(self) -> np.ndarray:
        """bool [len(input_ids)]: True at positions that carry a teacher distribution."""
        mask = np.zeros(len(self.input_ids), dtype=bool)
        mask[self.positions] = True
        return mask


@dataclass
class RowBlock:
    """A checked batch in the writer's internal form (row lists + concatenated payload)."""

    sample_ids: list[str]
    input_ids: list[np.ndarray]
    positions: list[np.ndarray]
    labels: list[int | None]
    payload: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.sample_ids)

    @property
    def num_positions(self) -> int:
        return int(sum(len(p) for p in self.positions))

    def positions_per_row(self) -> np.ndarray:
        """int64 [num_rows]: how many target positions each row has."""
        return np.array([len(p) for p in self.positions], dtype=np.int64)

    def nbytes(self) -> int:
        """Approximate memory held, used for the shard byte budget."""
        return int(sum(a.nbytes for a in self.input_ids) + sum(a.nbytes for a in self.positions)
                   + sum(a.nbytes for a in self.payload.values()) + 64 * self.num_rows)


@dataclass
class BatchRows:
    """The rows of one decoded record batch, for the row rules and their messages.

    ``pos_offsets`` cut the flat ``positions`` into rows; ``id_limit`` is the exclusive bound on
    token ids (0: not checked).
    """

    shard: str
    first_row: int
    sample_ids: list[str]
    pos_offsets: np.ndarray
    positions: np.ndarray
    id_limit: int

    def row(self, r: int) -> str:
        from cache_format.manifest import printable  # here: manifest imports shard, which imports this module

        return f"shard {self.shard} row {self.first_row + r} (sample_id {printable(repr(self.sample_ids[r]), 80)})"

    def position(self, flat: int) -> str:
        """Where the target position with flat index ``flat`` (over the whole batch) is."""
        r = int(np.searchsorted(self.pos_offsets, flat, side="right") - 1)
        return f"{self.row(r)} position {int(self.positions[flat])}"

    def invalid(self, where: str, rule: str) -> InvariantError:
        return InvariantError(f"{where}: {rule}; {INVALID_FIX}")

    def check(self, bad: np.ndarray, rule: str) -> None:
        """Raise for the first target position (flat index over the batch) where ``bad`` is True."""
        if bad.any():
            raise self.invalid(self.position(int(np.flatnonzero(bad)[0])), rule)

    def entry_position(self, entry_starts: np.ndarray, entry: int) -> str:
        """Where flat entry ``entry`` is, given each position's first entry (``entry_starts``, n + 1 values)."""
        return self.position(int(np.searchsorted(entry_starts, entry, side="right") - 1))

    def check_ids(self, ids: np.ndarray, entry_starts: np.ndarray, what: str) -> None:
        """Flat token ids (``what`` names them) must lie in [0, id_limit)."""
        if not ids.size or not self.id_limit:
            return
        # One pass for int32 ids: seen as unsigned, a negative id (4 byte planes, top bit set) is huge too.
        seen = ids.view(np.uint32) if ids.dtype == np.int32 else ids
        if int(seen.max()) >= self.id_limit or (seen.dtype.kind == "i" and int(seen.min()) < 0):
            e = int(np.flatnonzero((ids >= self.id_limit) | (ids < 0))[0])
            raise self.invalid(self.entry_position(entry_starts, e),
                               f"{what} token id {int(ids[e])} >= vocab size {self.id_limit} or < 0 (ids must be "
                               "below the identity's id limit)")


def check_common(ctx: BatchRows, id_bytes: np.ndarray, inputs: np.ndarray, in_offsets: np.ndarray) -> None:
    """Rules every row has, whatever its encoding: sample ids, input ids and target positions.

    ``id_bytes``: UTF-8 length of each sample id; ``inputs``/``in_offsets``: the flat input ids.
    """
    bad_id = (id_bytes == 0) | (id_bytes > MAX_SAMPLE_ID_BYTES)
    if bad_id.any():
        r = int(np.flatnonzero(bad_id)[0])
        raise ctx.invalid(ctx.row(r), f"sample_id is empty or over {MAX_SAMPLE_ID_BYTES} bytes")
    if ctx.id_limit and inputs.size and (int(inputs.max()) >= ctx.id_limit or int(inputs.min()) < 0):
        flat = int(np.flatnonzero((inputs >= ctx.id_limit) | (inputs < 0))[0])
        r = int(np.searchsorted(in_offsets, flat, side="right") - 1)
        raise ctx.invalid(ctx.row(r), f"input_ids hold token id {int(inputs[flat])} >= vocab size {ctx.id_limit} "
                                      "or < 0")
    pos, off = ctx.positions, ctx.pos_offsets
    if not pos.size:
        return
    counts = np.diff(off)
    row_len = np.diff(in_offsets)[np.repeat(np.arange(len(counts)), counts)]
    rising = np.ones(pos.size, dtype=bool)
    rising[1:] = pos[1:] > pos[:-1]
    rising[off[:-1][counts > 0]] = True  # a row's first position has no predecessor
    bad = (pos < 0) | (pos >= row_len) | ~rising
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        rule = ("is negative" if pos[t] < 0 else f"is not below the row's {int(row_len[t])} tokens"
                if pos[t] >= row_len[t] else "does not follow the previous position (must be strictly increasing)")
        raise ctx.invalid(ctx.position(t), f"target position {rule}")


def make_locator(sample_ids: list[str], positions: list[np.ndarray]) -> Any:
    """Map a flat target-position index to 'sample_id X position t' for error messages."""
    ends = np.cumsum([len(p) for p in positions])

    def locate(flat: int) -> str:
        r = int(np.searchsorted(ends, flat, side="right"))
        start = int(ends[r - 1]) if r else 0
        if r >= len(sample_ids):
            return f"flat position {flat}"
        return f"sample_id {sample_ids[r]!r} position {int(positions[r][flat - start])}"

    return locate


def _as_int_array(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise EncodingError(f"{what} must be a 1-D integer array, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise EncodingError(f"{what} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int32)


def check_rows(batch: Any, id_limit: int | None, need_positions: bool) -> RowBlock:
    """Checks every batch gets (ids, input_ids, positions, labels); the encoding's payload is left empty."""
    sids = [str(s) for s in batch.sample_ids]
    n = len(sids)
    if len(set(sids)) != n:
        seen: set[str] = set()
        dup = next(s for s in sids if s in seen or seen.add(s))  # type: ignore[func-returns-value]
        raise DuplicateError(f"sample_id {dup!r} appears twice in one batch; sample ids must be unique in a cache")
    if any(s == "" for s in sids):
        raise EncodingError("a sample_id is the empty string; give every row a stable non-empty id")
    long_id = next((s for s in sids if len(s.encode("utf-8", "surrogatepass")) > MAX_SAMPLE_ID_BYTES), None)
    if long_id is not None:
        raise EncodingError(f"sample_id {long_id[:40]!r}... is over {MAX_SAMPLE_ID_BYTES} bytes in UTF-8; use a "
                            "shorter stable id (e.g. a hash of the text)")
    raw_inputs = batch.input_ids if batch.input_ids is not None else [np.zeros(0, np.int32)] * n
    if len(raw_inputs) != n:
        raise EncodingError(f"batch has {n} sample_ids but {len(raw_inputs)} input_ids arrays; give one per row")
    inputs = [_as_int_array(x, f"input_ids of sample_id {s!r}") for x, s in zip(raw_inputs, sids, strict=True)]
    if id_limit is not None:
        for s, a in zip(sids, inputs, strict=True):
            if a.size and (int(a.min()) < 0 or int(a.max()) >= id_limit):
                raise EncodingError(f"input_ids of sample_id {s!r} hold a token id outside [0, {id_limit}); "
                                    "check the tokenizer/model pairing in the identity")
    if need_positions:
        if len(batch.positions) != n:
            raise EncodingError(f"batch has {n} sample_ids but {len(batch.positions)} positions arrays")
        positions = [_as_int_array(p, f"positions of sample_id {s!r}") for p, s in
                     zip(batch.positions, sids, strict=True)]
        for s, p, x in zip(sids, positions, inputs, strict=True):
            if p.size and (int(p[0]) < 0 or int(p[-1]) >= len(x) or (p.size > 1 and (np.diff(p) <= 0).any())):
                raise EncodingError(f"positions of sample_id {s!r} must be strictly increasing and within "
                                    f"[0, len(input_ids)={len(x)}), got {p[:8].tolist()}...")
    else:
        positions = [np.zeros(0, np.int32) for _ in range(n)]
    labels_in = batch.labels if batch.labels is not None else [None] * n
    if len(labels_in) != n:
        raise EncodingError(f"batch has {n} sample_ids but {len(labels_in)} labels; give one per row or None")
    labels: list[int | None] = []
    for s, lab in zip(sids, labels_in, strict=True):
        if lab is not None and (isinstance(lab, bool) or not isinstance(lab, int | np.integer)):
            raise EncodingError(f"label of sample_id {s!r} must be an int or None, got {lab!r}")
        labels.append(None if lab is None else int(lab))
    return RowBlock(sids, inputs, positions, labels)
