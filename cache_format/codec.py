"""Vectorized encode/decode of the three encodings (numpy only, no per-token Python loops).

The exact byte layout is normative and described in ``SPEC.md``; this module is its
reference implementation. Functions here take and return flat arrays for a whole batch
of positions; splitting into rows is the caller's job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cache_format.errors import EncodingError

# Value deltas are uint8, so a quantized -log-prob can reach 255 steps: 31.9 nats at step 1/8.
# Entries below that floor (p < 1.4e-14) are clamped to it; their share of the KL is negligible.
MAX_VALUE_CODE = 255
# Tail code: uint16 of -ln(tail) in units of 1/TAIL_SCALE nats; TAIL_ZERO means "no tail mass".
# 1/2048 nats resolution is a 0.05% relative error on the tail, far below the value quantization.
TAIL_SCALE = 2048.0
TAIL_ZERO = 65535
# Log-prob of padding entries in decoded ``sampled`` rows: finite (so 0 * logp stays 0, never NaN)
# and far below any real log-prob (exp() underflows to exactly 0 in float32).
PAD_LOGPROB = -1.0e9
# Log-probs slightly above 0 happen with float32 rounding of a near-certain token; beyond this they are bugs.
POSITIVE_LOGPROB_TOLERANCE = 1e-4

Locate = Callable[[int], str]


def id_bytes_for(id_limit: int) -> int:
    """Number of little-endian byte planes needed for ids < ``id_limit`` (2 up to 65,536 ids)."""
    if id_limit <= 1 << 16:
        return 2
    if id_limit <= 1 << 24:
        return 3
    return 4


def split_planes(ids: np.ndarray, n_bytes: int) -> list[np.ndarray]:
    """uint8 planes of ``ids`` (byte 0 = least significant), each the same length as ``ids``."""
    u = np.ascontiguousarray(ids, dtype="<u2" if n_bytes == 2 else "<u4").reshape(-1)
    as_bytes = u.view(np.uint8).reshape(-1, u.itemsize)
    return [np.ascontiguousarray(as_bytes[:, b]) for b in range(n_bytes)]


def join_planes(planes: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`split_planes`: int32 ids from their uint8 planes."""
    out = planes[-1].astype(np.int32)
    for plane in reversed(planes[:-1]):
        out <<= 8
        out |= plane
    return out


def _first_bad_row(bad: np.ndarray) -> int:
    """Index of the first position (row of a 2-D mask) that has a True entry."""
    return int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])


def check_ids(ids: np.ndarray, id_limit: int, locate: Locate, field: str) -> None:
    """Reject ids outside [0, id_limit) naming the first offender."""
    bad = (ids < 0) | (ids >= id_limit)
    if bad.any():
        r = _first_bad_row(bad)
        value = int(ids.reshape(ids.shape[0], -1)[r][bad.reshape(bad.shape[0], -1)[r]][0])
        raise EncodingError(f"{field} at {locate(r)} holds token id {value}, outside [0, {id_limit}) "
                            "(the identity's tokenizer.model_vocab_size/vocab_size); check the tokenizer/model pairing")


def check_finite(x: np.ndarray, locate: Locate, field: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        raise EncodingError(f"{field} at {locate(_first_bad_row(bad))} is NaN or infinite; the teacher produced non-finite "
                            "log-probs (check its dtype/overflow) — NaN/inf are never written to a cache")


# Per-position log-normaliser code: int16 in units of 2^-15 nats (range ±1 nat, enough for
# |ln(M / (1 - tail))| <= value_step/2 <= 0.5); its rounding error ends up in the tail bucket, so it must be fine.
NORM_SCALE = 32768.0
NORM_CODE_MAX = 32767


@dataclass
class EncodedTopK:
    values: np.ndarray  # uint8 [n*k]: quantized -log-probs, delta-coded mod 256 (restart per row, see encode_topk)
    id_planes: list[np.ndarray]  # id_bytes x uint8 [n*k]
    tail_code: np.ndarray  # uint16 [n]
    norm_code: np.ndarray  # int16 [n]


def encode_tail(tail: np.ndarray) -> np.ndarray:
    """uint16 code of tail mass in [0, 1]: round(-ln(tail) * 2048), 65535 for tail == 0."""
    t = np.asarray(tail, dtype=np.float64)
    with np.errstate(divide="ignore"):
        code = np.rint(-np.log(np.maximum(t, 0.0)) * TAIL_SCALE)
    code = np.where(t > 0, np.clip(code, 0, TAIL_ZERO - 1), TAIL_ZERO)
    return code.astype(np.uint16)


def decode_tail(code: np.ndarray) -> np.ndarray:
    """float64 tail mass from its uint16 code (65535 → 0)."""
    c = np.asarray(code, dtype=np.float64)
    return np.where(c >= TAIL_ZERO, 0.0, np.exp(-c / TAIL_SCALE))


def exact_tail(logprobs: np.ndarray) -> np.ndarray:
    """1 - sum(exp(logprobs)) per position, exp and sum in float64 (SPEC §3.1), clipped to [0, 1]."""
    mass = np.exp(np.asarray(logprobs, dtype=np.float64)).sum(axis=1)
    return np.clip(1.0 - mass, 0.0, 1.0)


def row_delta(codes: np.ndarray, row_lengths: np.ndarray) -> np.ndarray:
    """Delta-code a flat uint8 stream mod 256, restarting (previous value 0) at each row start."""
    flat = codes.reshape(-1).astype(np.uint8)
    out = np.empty_like(flat)
    if flat.size:
        out[0] = flat[0]
        np.subtract(flat[1:], flat[:-1], out=out[1:])
        starts = np.cumsum(row_lengths)[:-1]
        starts = starts[starts < flat.size]
        out[starts] = flat[starts]
    return out


def row_undelta(values: np.ndarray, row_offsets: np.ndarray) -> np.ndarray:
    """Inverse of :func:`row_delta`: cumulative sum mod 256, restarted at each row offset."""
    q = np.cumsum(values, dtype=np.uint8)
    # The running sum carried the previous rows' total into each later row: take it out (mod 256),
    # using the raw running sums read before any row is corrected.
    starts = np.asarray(row_offsets[1:-1], dtype=np.int64)
    ends = np.asarray(row_offsets[2:], dtype=np.int64)
    bases = np.where(starts > 0, q[np.maximum(starts - 1, 0)] if q.size else 0, 0).astype(np.uint8)
    for a, b, base in zip(starts.tolist(), ends.tolist(), bases.tolist(), strict=True):
        if b > a and base:
            q[a:b] -= np.uint8(base)
    return q


def _quantize(logprobs: np.ndarray, value_step: float) -> np.ndarray:
    q = np.rint(logprobs * np.float32(-1.0 / value_step))
    np.clip(q, 0, MAX_VALUE_CODE, out=q)
    return q.astype(np.uint8)


def _normaliser(q: np.ndarray, tail: np.ndarray, value_step: float, locate: Locate) -> tuple[np.ndarray, np.ndarray]:
    """``norm_code`` int16 [n] and the tail it leaves, ``1 - exp(-norm_code/2^15) * M`` (SPEC §3.1, writer rule 1.1).

    The decoded top-k mass should be the exact top-k mass ``1 - tail``, so the tail keeps its own
    value instead of being divided by ``M + tail`` (a 1.0 writer's rule: up to ``step/2`` relative
    error on the tail). The code is the nearest point of the 2^-15 grid, but never so small that
    the tail would go negative. ``M`` in float64: float32 sums broke the sum bound by up to 2e-6.
    """
    table = np.exp(-np.arange(MAX_VALUE_CODE + 1, dtype=np.float64) * value_step)
    mass = table[q].sum(axis=1)
    with np.errstate(divide="ignore"):
        log_mass = np.log(mass)
        target = np.rint((log_mass - np.log1p(-tail)) * NORM_SCALE)  # +inf where the tail is 1
    lowest = np.ceil(log_mass * NORM_SCALE)  # the smallest code whose tail is >= 0
    if (lowest > NORM_CODE_MAX).any():
        i = int(np.flatnonzero(lowest > NORM_CODE_MAX)[0])
        raise EncodingError(f"logprobs at {locate(i)} add up to a probability mass of {float(mass[i]):.4g} (quantized), "
                            "far above 1: pass log-softmax values (log-probabilities), not raw logits")
    norm_code = np.clip(np.maximum(target, lowest), -NORM_CODE_MAX, NORM_CODE_MAX).astype(np.int16)
    tail_dec = np.clip(1.0 - np.exp(-norm_code / NORM_SCALE) * mass, 0.0, 1.0)
    return norm_code, tail_dec


@dataclass
class QuantizedTopK:
    """The checked, quantized top-k of a block of positions, before any id/value layout (SPEC §3.1)."""

    ids: np.ndarray  # [n, k], entries ordered by log-prob descending
    q: np.ndarray  # uint8 [n, k]: round(-logprob / value_step), clamped to [0, 255]
    tail_code: np.ndarray  # uint16 [n]
    norm_code: np.ndarray  # int16 [n]


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray | None, *, value_step: float,
                id_limit: int, locate: Locate, row_lengths: np.ndarray | None = None) -> EncodedTopK:
    """Encode ``[n, k]`` ids/log-probs (sorted descending here if needed) and the tail into v1 streams.

    ``row_lengths`` are the rows' position counts (the value deltas restart at each row so a row
    decodes on its own); default: one row.
    """
    t = quantize_topk(ids, logprobs, tail, value_step=value_step, id_limit=id_limit, locate=locate)
    n, k = t.q.shape
    lengths = np.array([n], np.int64) if row_lengths is None else np.asarray(row_lengths, np.int64)
    return EncodedTopK(values=row_delta(t.q, lengths * k), id_planes=split_planes(t.ids, id_bytes_for(id_limit)),
                       tail_code=t.tail_code, norm_code=t.norm_code)


def quantize_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray | None, *, value_step: float,
                  id_limit: int, locate: Locate) -> QuantizedTopK:
    """Check ``[n, k]`` ids/log-probs and the tail, sort entries descending, quantize, and code norm and tail."""
    n, k = logprobs.shape
    logprobs = np.asarray(logprobs, dtype=np.float32)
    check_finite(logprobs, locate, "logprobs")
    ids = np.asarray(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= id_limit):
        check_ids(ids, id_limit, locate, "ids")
    if n and k:
        top = logprobs[:, 0] if k == 1 else logprobs.max(axis=1)
        if float(top.max()) > POSITIVE_LOGPROB_TOLERANCE:
            row = int(np.argmax(top))
            raise EncodingError(f"logprobs at {locate(row)} has {float(top[row]):.6g} > 0: pass log-softmax "
                                "values (log-probabilities), not raw logits")
    # Sort descending only where needed: teachers normally hand us torch.topk output, already sorted.
    if k > 1 and (logprobs[:, 1:] > logprobs[:, :-1]).any():
        order = np.argsort(-logprobs, axis=1, kind="stable")
        logprobs = np.take_along_axis(logprobs, order, axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
    if tail is None:
        tail_v = exact_tail(logprobs)
    else:
        tail_v = np.asarray(tail, dtype=np.float64).reshape(-1)
        if tail_v.shape[0] != n:
            raise EncodingError(f"tail has {tail_v.shape[0]} values but there are {n} target positions")
        bad = ~np.isfinite(tail_v) | (tail_v < -1e-6) | (tail_v > 1 + 1e-6)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise EncodingError(f"tail at {locate(i)} is {tail_v[i]!r}; it must be a probability mass in [0, 1]")
        tail_v = np.clip(tail_v, 0.0, 1.0)
    q = _quantize(logprobs, value_step)
    norm_code, tail_dec = _normaliser(q, tail_v, value_step, locate)
    return QuantizedTopK(ids=ids, q=q, tail_code=encode_tail(tail_dec), norm_code=norm_code)


def decode_topk(values: np.ndarray, id_planes: list[np.ndarray], tail_code: np.ndarray, norm_code: np.ndarray, *,
                k: int, value_step: float, row_offsets: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode to ``ids`` int32 [n, k], ``logprobs`` float32 [n, k] (descending), ``tail`` float32 [n].

    ``logprobs = -q * value_step - norm``: the top-k plus the tail sum to 1 within SPEC §3.1's
    bound (``2.5e-4 * tail + 1e-5``). ``row_offsets``: entry offsets of the rows in ``values`` (default: one row).
    """
    n = len(tail_code)
    offsets = np.array([0, len(values)], np.int64) if row_offsets is None else row_offsets
    q = row_undelta(values, offsets).reshape(n, k)
    logprobs = np.multiply(q, np.float32(-value_step), dtype=np.float32)
    logprobs -= (np.asarray(norm_code, dtype=np.float32) * np.float32(1.0 / NORM_SCALE))[:, None]
    ids = join_planes(id_planes).reshape(n, k)
    return ids, logprobs, decode_tail(tail_code).astype(np.float32)


@dataclass
class EncodedSampled:
    num_unique: np.ndarray  # uint8 [n]
    counts: np.ndarray  # uint8 [u]
    id_planes: list[np.ndarray]  # id_bytes x uint8 [u]


def encode_sampled(draws: np.ndarray, *, num_draws: int, id_limit: int, locate: Locate) -> EncodedSampled:
    """Unique ids per position with their counts, ordered by count descending then id ascending."""
    n = draws.shape[0]
    if draws.ndim != 2 or draws.shape[1] != num_draws:
        raise EncodingError(f"draws must have shape [n_positions, {num_draws}] (num_draws), got {draws.shape}")
    draws = np.asarray(draws, dtype=np.int64)
    check_ids(draws, id_limit, locate, "draws")
    if n == 0:
        empty = np.zeros(0, np.uint8)
        return EncodedSampled(empty, empty, split_planes(np.zeros(0, np.int64), id_bytes_for(id_limit)))
    s = np.sort(draws, axis=1)
    # Run-length encode each sorted row: a run starts where the id changes (or at column 0).
    start = np.ones_like(s, dtype=bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    row_of = np.nonzero(start)[0]
    flat_starts = np.flatnonzero(start.reshape(-1))
    run_end = np.append(flat_starts[1:], s.size)
    # Runs never cross rows because column 0 always starts a run.
    counts = (run_end - flat_starts).astype(np.int64)
    uids = s.reshape(-1)[flat_starts]
    # Order within a row: count descending, then id ascending (lexsort: last key is primary).
    order = np.lexsort((uids, -counts, row_of))
    num_unique = np.bincount(row_of, minlength=n)
    return EncodedSampled(num_unique=num_unique.astype(np.uint8), counts=counts[order].astype(np.uint8),
                          id_planes=split_planes(uids[order], id_bytes_for(id_limit)))


def decode_sampled(num_unique: np.ndarray, counts: np.ndarray, uids: np.ndarray, *,
                   num_draws: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Padded ``ids`` int32 [n, m], ``counts`` int32 [n, m], ``logprobs`` float32 [n, m], ``tail`` [n].

    ``uids``: the unique ids (joined byte planes), one per count. ``m`` is the largest unique
    count in the batch; padding has id 0, count 0 and log-prob
    ``PAD_LOGPROB``. The unbiased estimate of p(id) is count / num_draws, so logprobs = ln(count/N).
    """
    n = len(num_unique)
    nu = num_unique.astype(np.int64)
    m = int(nu.max(initial=0))
    row = np.repeat(np.arange(n), nu)
    starts = np.cumsum(nu) - nu
    col = np.arange(len(counts)) - np.repeat(starts, nu)
    ids = np.zeros((n, m), np.int32)
    cnt = np.zeros((n, m), np.int32)
    ids[row, col] = uids
    cnt[row, col] = counts
    with np.errstate(divide="ignore"):
        lp = np.where(cnt > 0, np.log(np.maximum(cnt, 1) / float(num_draws)), PAD_LOGPROB).astype(np.float32)
    return ids, cnt, lp, np.zeros(n, np.float32)
