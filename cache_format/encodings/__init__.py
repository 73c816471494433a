"""The table of encodings: one module per kind (parameters, batch type, Arrow columns, encode, decode, checks).

Adding an encoding means adding its module here and one entry to ``ENCODINGS``; shard, writer,
reader and verify look the kind up in this table and hold no per-kind code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cache_format.encodings.base import EncodingFormat
from cache_format.encodings.class_logits import ClassLogitsBatch, ClassLogitsEncoding, ClassLogitsFormat
from cache_format.encodings.sampled import SampledBatch, SampledEncoding, SampledFormat
from cache_format.encodings.topk import TopKBatch, TopKEncoding, TopKFormat
from cache_format.errors import EncodingError

if TYPE_CHECKING:
    from cache_format.identity import CacheIdentity
    from cache_format.rows import RowBlock

ENCODINGS: dict[str, EncodingFormat] = {f.kind: f for f in (TopKFormat(), SampledFormat(), ClassLogitsFormat())}

Encoding = TopKEncoding | SampledEncoding | ClassLogitsEncoding
Batch = TopKBatch | SampledBatch | ClassLogitsBatch


def encoding_format(kind: Any) -> EncodingFormat:
    """The table entry of ``kind``; raises EncodingError naming the kinds this library knows."""
    try:
        return ENCODINGS[kind]
    except (KeyError, TypeError):
        raise EncodingError(f"unknown encoding kind {kind!r}; this library knows "
                            + ", ".join(repr(k) for k in ENCODINGS)) from None


def check_batch(batch: Any, identity: CacheIdentity) -> RowBlock:
    """Structural checks of a batch against the identity; returns the writer's internal form."""
    return ENCODINGS[identity.encoding.kind].check_batch(batch, identity)


__all__ = ["ENCODINGS", "Batch", "ClassLogitsBatch", "ClassLogitsEncoding", "Encoding", "EncodingFormat",
           "SampledBatch", "SampledEncoding", "TopKBatch", "TopKEncoding", "check_batch", "encoding_format"]
