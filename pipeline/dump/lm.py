"""What the teacher sees in an LM row: the BOS policy, the token stream, overlapping windows, provenance.

**Documents.** Every dataset row whose text is not blank (``text.strip() == ""`` rows are
dropped, all others are used verbatim) is one document, tokenized with
``tokenizer(text, add_special_tokens=False)`` and followed by EOS (when the tokenizer has
one). Packed (the default), the documents in dataset order form one token stream, so a window
may hold the end of one document and the start of the next: attention crosses that boundary,
the EOS between them tells the teacher a new document starts. ``--no-pack`` makes each
document a stream of its own (no row mixes documents).

**Units.** A dump reads, tokenizes and packs its dataset one work unit at a time
(:mod:`pipeline.dump.sources`), so packing restarts at every unit boundary: each unit's
documents form their own stream, and its first window has only the unit's own context (no
tokens of the unit before). The cost: one short first window per unit and, for the first
``max_length - stride`` targets of each unit, less context than an unbroken stream would give
(with 512 KiB units, ~130k tokens, that is under 1% of targets at ``max_length`` 2048).

**BOS.** With a BOS in use (:func:`resolve_bos`), every row is ``[BOS] + stream[a:b]``: the
BOS is a context slot, never a target, and documents inside the stream carry no BOS of their
own (a row never starts with two). Without one the row is ``stream[a:b]``, and its first token
is context only.

**Windows.** Rows hold ``max_length`` slots; at most ``max_length - 1`` of them are targets
(the first slot is BOS or a context token). The first window of a stream targets as many
tokens as fit; every later one targets the next ``stride`` tokens and fills the rest of the
row with the tokens just before them, so consecutive windows overlap by
``max_length - 1 - stride`` stream tokens (``max_length - stride`` without BOS) and every target
after the first window sees at least ``max_length - stride`` tokens of context (BOS included).
Each stream token is a target exactly once, except the stream's first token without BOS.

**Provenance.** A row's ``sample_id`` is ``doc<D>:tok<T>@doc<D0>:tok<T0>``: its first target is
token ``T`` of document ``D`` and its first stream token (after BOS) token ``T0`` of document ``D0``;
offsets count the document's tokens as tokenized above, EOS included (0-based). ``D`` is the
document's row key: in a dump, the byte offset of its line in a text / JSON-lines file, or the row
index in row-unit sources (Parquet, CSV, ``datasets``); for a whole in-memory dataset (eval), the
row index.
:func:`parse_lm_sample_id` reads it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.errors import ConfigError, DatasetError

BosPolicy = Literal["auto", "always", "never"]
BOS_POLICIES: tuple[str, ...] = ("auto", "always", "never")
LM_SAMPLE_ID_GRAMMAR = "doc<D>:tok<T>@doc<D0>:tok<T0>"
_LM_SAMPLE_ID = re.compile(r"doc(\d+):tok(\d+)@doc(\d+):tok(\d+)")


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer's own convention puts BOS first: ``add_bos_token``, or ``tokenizer("x")`` does."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if getattr(tokenizer, "add_bos_token", None) is True:
        return True
    return tokenizer("x")["input_ids"][:1] == [bos]


def resolve_bos(tokenizer: Any, policy: str) -> int | None:
    """The BOS id rows start with under ``policy`` (``--bos``), or None for no BOS."""
    if policy not in BOS_POLICIES:
        raise ConfigError(f"--bos must be one of {', '.join(BOS_POLICIES)}, got {policy!r}")
    if policy == "never":
        return None
    if policy == "always":
        if tokenizer.bos_token_id is None:
            raise ConfigError(
                f"--bos always: tokenizer {getattr(tokenizer, 'name_or_path', '') or '(given)'} has no BOS token; "
                "use --bos auto (follow the tokenizer) or --bos never"
            )
        return int(tokenizer.bos_token_id)
    return int(tokenizer.bos_token_id) if tokenizer_adds_bos(tokenizer) else None


def normalize_bos(ids: list[int], bos_id: int | None, policy: str) -> list[int]:
    """A prompt or text row with at most one leading BOS.

    ``auto`` keeps whatever the tokenizer (or chat template) put first, collapsing a doubled BOS;
    ``always`` makes sure one is there; ``never`` removes it.
    """
    if bos_id is None:
        return ids
    head = 0
    while head < len(ids) and ids[head] == bos_id:
        head += 1
    want = policy == "always" or (policy == "auto" and head > 0)
    return ([bos_id] if want else []) + ids[head:]


def default_stride(max_length: int) -> int:
    """Targets per window when ``--stride`` is not given (see ``DumpConfig.stride`` for the measurement)."""
    return max(1, (max_length * 3) // 4)


def check_stride(stride: int, max_length: int) -> None:
    cap = max_length - 1
    if not 1 <= stride <= cap:
        raise ConfigError(
            f"--stride {stride} must be between 1 and {cap} (the targets one window of --max-length {max_length} "
            f"holds); lower --stride or raise --max-length"
        )


def window_spans(n: int, max_length: int, stride: int, has_bos: bool) -> np.ndarray:
    """``[k, 3]`` int64 ``(start, first_target, end)`` stream indices of each window over ``n`` tokens.

    The row holds ``stream[start:end]`` (after BOS); its targets are ``stream[first_target:end]``.
    """
    first = 0 if has_bos else 1
    if n <= first:
        return np.zeros((0, 3), dtype=np.int64)
    room = max_length - int(has_bos)  # stream tokens per row
    t0 = np.concatenate([[first], np.arange(first + max_length - 1, n, stride, dtype=np.int64)])
    ends = np.minimum(np.concatenate([t0[1:], [n]]), n)
    # The last window is short: it takes more context, up to a full row.
    starts = np.maximum(0, ends - room)
    return np.stack([starts, t0, ends], axis=1).astype(np.int64)


@dataclass
class _Stream:
    """Documents joined into one token stream: ``starts[d]`` is where document ``d`` begins, ``rows[d]`` its dataset row."""

    ids: np.ndarray
    starts: np.ndarray
    rows: np.ndarray

    def locate(self, j: int) -> tuple[int, int]:
        """(dataset row, token offset in its document) of stream token ``j``."""
        d = int(np.searchsorted(self.starts, j, side="right")) - 1
        return int(self.rows[d]), int(j - self.starts[d])

    def split_documents(self, spans: np.ndarray) -> int:
        """Documents with a window boundary (a later window's first target) strictly inside them."""
        cuts = spans[1:, 1]
        if not len(cuts):
            return 0
        ends = np.append(self.starts[1:], len(self.ids))
        first_cut = np.searchsorted(cuts, self.starts, side="right")  # first cut after each document start
        inside = cuts[np.minimum(first_cut, len(cuts) - 1)] < ends
        return int(np.sum((first_cut < len(cuts)) & inside))


def _streams(token_docs: list[np.ndarray], rows: list[int], pack: bool) -> list[_Stream]:
    if not pack:
        return [_Stream(d, np.zeros(1, dtype=np.int64), np.asarray([r])) for d, r in zip(token_docs, rows, strict=True)]
    lengths = np.asarray([len(d) for d in token_docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [_Stream(np.concatenate(token_docs), starts, np.asarray(rows))]


@dataclass
class LmRow:
    """One window: the row's tokens, its target positions and its provenance sample id."""

    sample_id: str
    input_ids: np.ndarray
    positions: np.ndarray


def lm_rows(
    token_docs: list[np.ndarray], rows: list[int], *, max_length: int, stride: int, bos_id: int | None, pack: bool
) -> tuple[list[LmRow], int]:
    """Windows over the documents (``token_docs[i]`` from dataset row ``rows[i]``); also the split-document count."""
    check_stride(stride, max_length)
    has_bos = bos_id is not None
    prefix = np.asarray([bos_id] if has_bos else [], dtype=np.int32)
    out: list[LmRow] = []
    split = 0
    for stream in _streams(token_docs, rows, pack):
        spans = window_spans(len(stream.ids), max_length, stride, has_bos)
        split += stream.split_documents(spans)
        for start, t0, end in spans.tolist():
            d, t = stream.locate(t0)
            d0, t0_off = stream.locate(start)
            ids = np.concatenate([prefix, stream.ids[start:end]]).astype(np.int32)
            lo = int(has_bos) + t0 - start - 1
            out.append(LmRow(f"doc{d}:tok{t}@doc{d0}:tok{t0_off}", ids,
                             np.arange(lo, lo + end - t0, dtype=np.int32)))
    return out, split


@dataclass(frozen=True)
class LmRowSource:
    """Where an LM row's tokens came from (:func:`parse_lm_sample_id`)."""

    doc: int  # row key (byte offset or row index) of the first target's document
    tok: int  # its token offset in that document
    first_doc: int  # dataset row of the row's first stream token (after BOS)
    first_tok: int


def parse_lm_sample_id(sample_id: str) -> LmRowSource:
    """Read ``doc<D>:tok<T>@doc<D0>:tok<T0>`` back (the ``sample_id`` of every LM row)."""
    m = _LM_SAMPLE_ID.fullmatch(sample_id)
    if m is None:
        raise DatasetError(f"sample_id {sample_id!r} is not an LM row id ({LM_SAMPLE_ID_GRAMMAR})")
    d, t, d0, t0 = (int(g) for g in m.groups())
    return LmRowSource(d, t, d0, t0)


def lm_recipe_facts(tokenizer: Any, *, bos_id: int | None, stride: int, pack: bool) -> dict[str, Any]:
    """The LM facts of the identity's ``recipe`` (``recipe.lm``): with ``recipe.bos_id``, ``add_special_tokens``
    (false: documents are tokenized bare), ``max_length``, ``pack`` and ``fields.text``, enough to rebuild every
    row from the dataset."""
    return {
        "documents": "one per dataset row whose text is not blank (text.strip() == '' rows are dropped); "
                     "text used verbatim",
        "eos_after_document": tokenizer.eos_token_id is not None,
        "eos_id": tokenizer.eos_token_id,
        "bos_at": "every window start (a context slot, never a target)" if bos_id is not None else None,
        "stride": stride,
        "attention_across_documents": pack,
        "sample_id": LM_SAMPLE_ID_GRAMMAR,
        "stream": "one packed stream per work unit (recipe.units); packing restarts at each unit boundary",
    }
